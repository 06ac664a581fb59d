"""DP-FedAvg: clipping on the shards, Gaussian noise on the sum, accounting with dp-accounting."""
