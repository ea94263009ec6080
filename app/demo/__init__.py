"""The offline demo: a synthetic world, the tiny CLIP pretrained on it, and its quality check."""
