"""Amaranth gateware for the M³ViT accelerator. Knows nothing of PyTorch or PYNQ."""
