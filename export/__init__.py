"""Checkpoint to verified ONNX model and a ready Triton model repository."""
