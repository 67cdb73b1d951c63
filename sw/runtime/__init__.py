"""Running an executable on a board: the host driver (``driver.Accelerator``), the boards it
drives (the Verilated SoC model, a ZCU104 through PYNQ), task-switching sessions and the
notebooks' helpers."""
