"""Amaranth gateware for the M³ViT accelerator. Knows nothing of PyTorch or PYNQ."""

import time as _time

#: When this process imported the gateware package: a source edited after it may no longer
#: be what the process elaborates (``m3vit.sim.soc`` then finds no build by its sources).
IMPORTED_AT = _time.time()
