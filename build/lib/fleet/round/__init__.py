"""The round: the coordinator, the shard actors and the secret sampler between them."""
