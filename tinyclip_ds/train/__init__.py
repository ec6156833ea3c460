"""DeepSpeed setup, the training loops, large-batch contrastive, checkpoints, monitoring."""
