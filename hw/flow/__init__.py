"""Tool flows that *use* the gateware: Verilog generation and lint (``generate``), Yosys
resource estimates (``resources``) and the Vivado build for the ZCU104 (``vivado``)."""
