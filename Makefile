# m3vit — make targets. Every target installs the project-local virtual environment first
# when needed, so the README's commands work on a fresh clone.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# Accelerator configuration for `make verilog` / `make resources` / `make bitstream` (zcu104 or
# ci) and the design `make resources` synthesizes (top, gemm, layernorm, softmax, residual,
# table).
CONFIG ?= zcu104
DESIGN ?= top

.DEFAULT_GOAL := help
.PHONY: help install test sim demo bench lint verilog resources bitstream clean

help: ## List the targets
	@echo "m3vit — M3ViT multi-task MoE ViT: PyTorch -> Amaranth accelerator -> ZCU104"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install the pinned requirements (idempotent)

test: $(STAMP) ## Run every test: model, toolchain check, cocotb benches (what CI runs)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

sim: $(STAMP) ## Run the cycle-accurate cocotb + Verilator benches only
	$(BIN)/python -m pytest tests/sim

lint: $(STAMP) ## ruff over the whole tree
	$(BIN)/ruff check .

demo: $(STAMP) ## Main job on the simulator: train, quantize, generate, simulate, switch tasks
	$(BIN)/python -m m3vit.sw.demo

bench: $(STAMP) ## Benchmarks (slow, not in CI); figures go to docs/benchmarks.md
	$(BIN)/python -m m3vit.sw.bench

# build/verilog is this target's own output, so a changed design replaces its old Verilog
# (--force); `m3vit generate` on its own refuses to overwrite a file that differs.
verilog: $(STAMP) ## Verilog of every design for CONFIG (default zcu104) + Verilator lint
	$(BIN)/m3vit generate --config $(CONFIG) --all --lint --force --out build/verilog/$(CONFIG)

resources: $(STAMP) ## Yosys synth_xilinx estimate of DESIGN (default top) vs the XCZU7EV, <= 80 %
	$(BIN)/m3vit resources --config $(CONFIG) --design $(DESIGN)

bitstream: $(STAMP) ## Vivado build for the ZCU104 (Vivado 2025.2 on PATH; else writes the scripts)
	$(BIN)/m3vit bitstream --config $(CONFIG) --out bitstreams $(if $(JOBS),--jobs $(JOBS))

clean: ## Remove build products (keeps .venv and trained runs)
	rm -rf build .pytest_cache .ruff_cache
