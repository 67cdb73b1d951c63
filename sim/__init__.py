"""Verilator builds, Python bindings and cocotb helpers for the M³ViT accelerator."""
