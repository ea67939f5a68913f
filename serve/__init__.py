"""Running Triton Inference Server on an exported model repository."""
