"""The detector: its factory, the data loader, the training engine, checkpoints and tiled inference."""
