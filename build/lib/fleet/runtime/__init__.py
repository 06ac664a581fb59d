"""Running and watching: the driver, Ray placement, checkpoints, the guards, W&B, reports and
the command lines."""
