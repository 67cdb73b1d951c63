"""Host software for the M³ViT toolkit, one sub-package per stage of the pipeline.

``model`` (float M³ViT, data, training) → ``quant`` (integer numerics, golden model,
quantizer, ``.m3q``) → ``compiler`` (program + DDR image, ``.m3x``, ISA model) →
``runtime`` (host driver, boards, sessions); ``cli``, ``demo`` and ``bench`` use them all.
Each stage imports only the stages before it; all of ``sw`` imports ``m3vit.sim`` and
``m3vit.hw``, never the other way round.
"""
