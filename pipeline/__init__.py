"""The whole pipeline on built-in data, as one command (make demo)."""
