"""Integer M³ViT: the accelerator's numerics, the bit-exact golden model, post-training
quantization and the quantized package (``.m3q``), with the float-vs-integer accuracy report."""
