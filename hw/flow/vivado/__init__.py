"""The Vivado flow for the ZCU104: a Vivado-ready top, the block design, the build, the manifest.

``m3vit bitstream --config zcu104 --out bitstreams`` (``make bitstream``) runs
:func:`run_flow`, which

1. elaborates the accelerator (:class:`m3vit.hw.top.AcceleratorTop`) and writes, to
   ``build/vivado/<config>/``, everything Vivado needs (:func:`write_project`): the
   accelerator's Verilog (``m3vit_accel.v``), a wrapper with standard AXI port names and the
   interface attributes Vivado's IP integrator recognises (``m3vit_accel_wrapper.v``), the
   block design (``block_design.tcl``: Zynq UltraScale+ PS with the ZCU104 board preset,
   AXI4-Lite control from ``M_AXI_HPM0_FPD``, the accelerator's AXI4 masters onto the HP
   ports, the PL clock at the configured target, the address map), the batch build
   (``build.tcl``: project, synthesis, implementation, bitstream, timing and utilisation
   reports), ``run.sh`` and ``flow.json`` (what the folder was generated from);
2. without Vivado on ``PATH`` says what to run on a machine that has it and fails with
   ``Vivado not found on PATH ...`` (one line ``m3vit: error: ...``, exit status 2, from the CLI);
3. with Vivado, checks that its version is the one the PYNQ image was built with
   (:data:`VIVADO_VERSION`), runs the build with a progress line per step, and copies
   ``<base>.bit`` and ``<base>.hwh`` (one base name, as ``pynq.Overlay`` requires) and the
   reports into ``--out`` next to ``manifest.json`` (config hash, clock, Vivado version,
   timing slack, utilisation). A bitstream built for another configuration hash is never
   replaced without ``--force``; a build that misses timing is reported and not copied.

``--collect`` does step 3's copy alone (:func:`collect`), for a build run elsewhere
(``build/vivado/<config>/out`` copied back). Nothing here imports PyTorch or PYNQ; the
runtime's side of the contract (the IP name prefix it looks up in the overlay's ``ip_dict``
and the register window it maps) is checked against :data:`ACCEL_CELL` and
:func:`register_window_bytes` by ``tests/hw/test_vivado.py``. ``docs/bitstream.md`` describes
the design.

Modules: :mod:`.board` (the ZCU104, its PYNQ image, shared names and addresses),
:mod:`.wrapper` (the Vivado-ready top), :mod:`.tcl` (block design, ``build.tcl``,
``run.sh``), :mod:`.reports` (reading Vivado's reports), :mod:`.collect` (a finished build
into ``bitstreams/`` and its manifest), :mod:`.flow` (writing the project, running Vivado).
"""

from .board import (
    ACCEL_CELL,
    ACCEL_MODULE,
    BD_NAME,
    BOARD,
    CONTROL_BASE,
    HP_PORTS,
    PART,
    PS_CELL,
    PYNQ_IMAGE,
    PYNQ_VIVADO,
    VIVADO_VERSION,
    WRAPPER_MODULE,
    base_name,
    register_window_bytes,
)
from .collect import MANIFEST_NAME, collect
from .flow import FlowFiles, default_build_dir, run_flow, write_project
from .reports import parse_timing_summary, parse_utilization, parse_vivado_version
from .tcl import block_design_tcl, build_tcl, run_sh
from .wrapper import BusInterface, WrapperPort, bus_interfaces, wrapper_verilog

__all__ = [
    "ACCEL_CELL",
    "ACCEL_MODULE",
    "BD_NAME",
    "BOARD",
    "CONTROL_BASE",
    "HP_PORTS",
    "MANIFEST_NAME",
    "PART",
    "PS_CELL",
    "PYNQ_IMAGE",
    "PYNQ_VIVADO",
    "VIVADO_VERSION",
    "WRAPPER_MODULE",
    "BusInterface",
    "FlowFiles",
    "WrapperPort",
    "base_name",
    "block_design_tcl",
    "build_tcl",
    "bus_interfaces",
    "collect",
    "default_build_dir",
    "parse_timing_summary",
    "parse_utilization",
    "parse_vivado_version",
    "register_window_bytes",
    "run_flow",
    "run_sh",
    "wrapper_verilog",
    "write_project",
]
