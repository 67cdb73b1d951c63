"""From a quantized model to what the accelerator runs: the lowering into one program and one
DDR image (``lower``), the byte layouts the runtime shares (``layout``), the executable file
(``.m3x``, ``executable``) and the instruction-level model of the hardware (``isa_model``)."""
