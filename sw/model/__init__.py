"""The float M³ViT: configuration and presets, the PyTorch model, synthetic multi-task
scenes, training, task metrics, MAC counts and the import of dense ViT weights from timm."""
