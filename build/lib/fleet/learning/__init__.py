"""What the fleet learns: the model, the local-training engines, the tasks and the data."""
