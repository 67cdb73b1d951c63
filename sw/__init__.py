"""Host software for the M³ViT toolkit: float model, training, (later) quantizer, compiler,
runtime and CLI. Imports ``m3vit.sim`` and ``m3vit.hw``, never the other way round."""
