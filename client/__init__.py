"""Light clients (no torch): the predict CLI and the Gradio demo."""
