"""Training 3G-Net: the model, its layers, checkpoints, data and the training script."""
