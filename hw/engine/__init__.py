"""The engine: everything between the DMA engines and the control registers.

It fetches the program (``docs/isa.md``) through the read DMA, checks each instruction,
and runs it on the GEMM engine, the vector units, the MoE dispatcher and combiner, and the
on-chip activation buffer, moving DDR data through the DMA streams. Its parts:

=====================  ===============================================================
part (module)          what it does
=====================  ===============================================================
``fetch``              :class:`~.fetch.InstructionFetch`: reads instruction ``pc``
                       through its line cache, holds it
``checks``             :class:`~.checks.InstructionChecks`: opcode, capacity, buffer
                       and DDR range checks of the instruction (two cycles)
``controller``         :class:`~.controller.Controller`: the state machine running
                       one instruction at a time
``router``             :class:`~.router.ReadRouter`: the read DMA shared by fetch and
                       operands; data to the sink in use through width converters
``datapath``           :class:`~.datapath.Datapath`: the activation buffer, its walked
                       ports switched to the unit in charge, the write DMA's data
``trace``              :class:`~.trace.InstructionTrace`: an entry per instruction
                       (span, bytes per port), read through the registers
``counters``           :class:`~.counters.PerformanceCounters`
units                  :class:`~m3vit.hw.gemm.GemmEngine`, the vector units, the
                       :class:`~m3vit.hw.moe.Dispatcher` and :class:`~m3vit.hw.moe.Combiner`
=====================  ===============================================================
"""

from amaranth.hdl import Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from ..axi import byte_beat_layout, dma_cmd_layout, entry_layout
from ..config import AccelConfig
from ..gemm import GemmEngine
from ..isa import check_top_config
from ..moe import Combiner, Dispatcher
from ..registers import MAX_TRACE_PORTS, EngineControlSignature
from ..vector import LayerNormUnit, ResidualAdd, SoftmaxUnit
from .checks import InstructionChecks
from .controller import CMD_SEQ_BITS, Controller
from .counters import PerformanceCounters
from .datapath import Datapath
from .fetch import InstructionFetch
from .router import ReadRouter, intake_shape
from .trace import InstructionTrace

#: GEMM commands the controller may have issued ahead of the engine.
GEMM_COMMANDS_QUEUED = 6

__all__ = ["Engine"]


class Engine(wiring.Component):
    """Instruction controller, activation buffer, GEMM engine and vector units.

    Parameters
    ----------
    config : AccelConfig
        The configuration (checked by :func:`~m3vit.hw.isa.check_top_config`).

    Attributes
    ----------
    ctrl : Out(EngineControlSignature())
        To the register file: the run's settings and start / abort in, its status and the
        engine's counters out (Verilog ``ctrl__start`` …).
    rd_cmd, rd_data, wr_cmd, wr_data : streams
        To / from the read and write DMA engines (byte address, beat count; reads in
        entries of :func:`~m3vit.hw.isa.intake_beats` beats, writes AXI-wide).
    wr_idle : In(1)
        No write command or response is outstanding in the write DMA.
    dma_error : In(1)
        A DMA saw SLVERR / DECERR since :attr:`dma_error_clear` was last pulsed.
    dma_error_clear : Out(1)
        Pulsed at the start of a run.
    token_beats : Out(32)
        Free-running count of tokens through the PE array (each is ``pe_rows · pe_cols``
        MACs, one cycle of the array computing); the benches read it, no register does.
    port_read_bytes : In(ArrayLayout(32, MAX_TRACE_PORTS))
        Free-running bytes read over each master port (0 for ports the top lacks).
    write_bytes : In(32)
        Free-running bytes written.
    """

    def __init__(self, config: AccelConfig):
        self.config = check_top_config(config)
        dma_cmd = dma_cmd_layout(config)
        super().__init__({
            "ctrl": Out(EngineControlSignature()),
            "rd_cmd": Out(stream.Signature(dma_cmd)),
            "rd_data": In(stream.Signature(entry_layout(config.axi_bytes,
                                                        intake_shape(config).entry_beats))),
            "wr_cmd": Out(stream.Signature(dma_cmd)),
            "wr_data": Out(stream.Signature(byte_beat_layout(config.axi_bytes))),
            "wr_idle": In(1),
            "dma_error": In(1),
            "dma_error_clear": Out(1),
            "token_beats": Out(32),
            "port_read_bytes": In(data.ArrayLayout(32, MAX_TRACE_PORTS)),
            "write_bytes": In(32),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        intake = intake_shape(cfg)
        gemm = m.submodules.gemm = GemmEngine(cfg, rows_per_beat=intake.rows_per_beat,
                                              params_per_beat=intake.params_per_beat,
                                              table_entries=intake.gemm_table_entries)
        ln = m.submodules.layernorm = LayerNormUnit(cfg)
        softmax = m.submodules.softmax = SoftmaxUnit(cfg, table_entries=intake.exp_table_entries)
        residual = m.submodules.residual = ResidualAdd(cfg)
        dispatcher = m.submodules.dispatcher = Dispatcher(cfg)
        combiner = m.submodules.combiner = Combiner(cfg)
        fetch = m.submodules.fetch = InstructionFetch(cfg)
        checks = m.submodules.checks = InstructionChecks(cfg)
        controller = m.submodules.controller = Controller(cfg)
        router = m.submodules.router = ReadRouter(cfg)
        datapath = m.submodules.datapath = Datapath(cfg)
        counters = m.submodules.counters = PerformanceCounters()
        trace = m.submodules.trace = InstructionTrace()

        # The controller and its parts.
        wiring.connect(m, controller.fetch, fetch.control)
        wiring.connect(m, controller.checks, checks.control)
        wiring.connect(m, controller.router, router.control)
        wiring.connect(m, controller.datapath, datapath.control)
        m.d.comb += [checks.instruction.eq(fetch.instruction),
                     controller.instruction.eq(fetch.instruction)]

        # The DMA engines: reads through the router, writes from the controller and the
        # datapath.
        wiring.connect(m, fetch.cmd, router.fetch_cmd)
        wiring.connect(m, controller.rd_cmd, router.operand_cmd)
        wiring.connect(m, router.rd_cmd, wiring.flipped(self.rd_cmd))
        wiring.connect(m, wiring.flipped(self.rd_data), router.rd_data)
        wiring.connect(m, router.fetch, fetch.beats)
        wiring.connect(m, controller.wr_cmd, wiring.flipped(self.wr_cmd))
        wiring.connect(m, datapath.wr_data, wiring.flipped(self.wr_data))
        m.d.comb += [controller.wr_idle.eq(self.wr_idle),
                     controller.dma_error.eq(self.dma_error),
                     self.dma_error_clear.eq(controller.dma_error_clear)]

        # The units: commands from the controller, parameters and tables from the router,
        # operands and results through the datapath.
        commands = self._gemm_command_queue(m, controller, gemm)
        wiring.connect(m, controller.ln_cmd, ln.cmd)
        wiring.connect(m, controller.softmax_cmd, softmax.cmd)
        wiring.connect(m, controller.residual_cmd, residual.cmd)
        wiring.connect(m, controller.dispatcher_cmd, dispatcher.cmd)
        wiring.connect(m, controller.combiner_cmd, combiner.cmd)
        wiring.connect(m, router.gemm_params, gemm.params)
        wiring.connect(m, router.gemm_table, gemm.table)
        wiring.connect(m, router.ln_params, ln.params)
        wiring.connect(m, router.softmax_table, softmax.table)
        wiring.connect(m, router.words, datapath.ddr_words)
        wiring.connect(m, router.gemm_weights, datapath.ddr_weights)
        wiring.connect(m, datapath.gemm_activations, gemm.activations)
        wiring.connect(m, datapath.gemm_weights, gemm.weights)
        wiring.connect(m, gemm.results, datapath.gemm_results)
        wiring.connect(m, datapath.ln_x, ln.x)
        wiring.connect(m, ln.y, datapath.ln_y)
        wiring.connect(m, datapath.softmax_logits, softmax.logits)
        wiring.connect(m, softmax.probs, datapath.softmax_probs)
        wiring.connect(m, datapath.route_scores, dispatcher.scores)
        wiring.connect(m, datapath.residual_a, residual.a)
        wiring.connect(m, datapath.residual_b, residual.b)
        wiring.connect(m, residual.y, datapath.residual_y)
        wiring.connect(m, datapath.combiner_y, combiner.y)
        wiring.connect(m, combiner.out, datapath.combiner_out)
        m.d.comb += [controller.gemm_busy.eq(gemm.busy | commands.r_rdy),
                     controller.softmax_busy.eq(softmax.busy)]
        # Commands the engine took from its queue: the controller starts a GEMM's weights
        # from the buffer early only once the engine holds that GEMM's command.
        cmds_taken = Signal(CMD_SEQ_BITS)
        with m.If(gemm.command.valid & gemm.command.ready):
            m.d.sync += cmds_taken.eq(cmds_taken + 1)
        m.d.comb += controller.gemm_cmds_taken.eq(cmds_taken)

        # The dispatcher's tables: read by port A's gather stage, the EXPERTS loop and the
        # checks.
        tables = controller.dispatcher
        m.d.comb += [
            dispatcher.queue_addr.eq(datapath.queue_addr),
            dispatcher.queue_en.eq(datapath.queue_en),
            datapath.queue_token.eq(dispatcher.queue_token),
            dispatcher.slot_addr.eq(datapath.slot_addr),
            dispatcher.slot_en.eq(datapath.slot_en),
            datapath.slot.eq(dispatcher.slot),
            dispatcher.list_index.eq(tables.list_index),
            tables.list_expert.eq(dispatcher.list_expert),
            tables.list_start.eq(dispatcher.list_start),
            tables.list_count.eq(dispatcher.list_count),
            tables.n_active.eq(dispatcher.n_active),
            tables.rows.eq(dispatcher.rows),
            tables.top_k.eq(dispatcher.top_k),
            tables.slot.eq(dispatcher.slot),
            tables.busy.eq(dispatcher.busy),
            checks.routed_rows.eq(dispatcher.rows),
            checks.routed_entries.eq(dispatcher.entries),
        ]

        # The register file's side: settings in, status and counters out.
        ctrl = self.ctrl
        m.d.comb += [
            controller.start.eq(ctrl.start),
            controller.abort_request.eq(ctrl.abort_request),
            controller.data_base.eq(ctrl.data_base),
            controller.task_select.eq(ctrl.task_select),
            controller.schedule.eq(ctrl.schedule),
            fetch.program_base.eq(ctrl.program_base),
            checks.data_size.eq(ctrl.data_size),
            ctrl.busy.eq(controller.busy),
            ctrl.done.eq(controller.done),
            ctrl.error.eq(controller.error),
            ctrl.error_code.eq(controller.error_code),
            ctrl.error_pc.eq(controller.error_pc),
        ]
        self._trace(m, trace, controller, fetch)
        m.d.comb += [
            counters.retired.eq(controller.retired),
            counters.gemm_busy.eq(gemm.busy),
            counters.layernorm_busy.eq(ln.busy),
            counters.softmax_busy.eq(softmax.busy),
            counters.residual_busy.eq(residual.busy),
            counters.dispatcher_busy.eq(dispatcher.busy),
            counters.combiner_busy.eq(combiner.busy),
            counters.gemm_weight_stall.eq(gemm.counters.weight_stall_cycles),
            counters.gemm_token_beats.eq(gemm.counters.token_beats),
            ctrl.counters.eq(counters.counters),
            self.token_beats.eq(counters.token_beats),
        ]
        return m

    @staticmethod
    def _gemm_command_queue(m: Module, controller: Controller, gemm: GemmEngine) -> SyncFIFO:
        """GEMM commands through a short queue: the controller issues a GEMM (its command
        and its weight stream) while the two before it still run, and goes on. Unbuffered:
        a command is visible the cycle after it is written, so the engine and its queue
        together never look idle while one is on its way."""
        commands = m.submodules.gemm_commands = SyncFIFO(
            width=gemm.command.payload.shape().size, depth=GEMM_COMMANDS_QUEUED)
        m.d.comb += [
            commands.w_data.eq(controller.gemm_cmd.payload),
            commands.w_en.eq(controller.gemm_cmd.valid),
            controller.gemm_cmd.ready.eq(commands.w_rdy),
            gemm.command.payload.eq(commands.r_data),
            gemm.command.valid.eq(commands.r_rdy),
            commands.r_en.eq(gemm.command.ready),
        ]
        return commands

    def _trace(self, m: Module, trace: InstructionTrace, controller: Controller,
               fetch: InstructionFetch) -> None:
        """The instruction trace: the controller's events, the DMA's byte counters, the
        register file's reads."""
        ctrl = self.ctrl
        m.d.comb += [
            trace.start.eq(ctrl.start),
            trace.busy.eq(controller.busy),
            trace.fetched.eq(fetch.control.issued),
            trace.pc.eq(controller.fetch.pc),
            trace.retired.eq(controller.retired | controller.done | controller.error),
            trace.drained.eq(controller.drained),
            trace.pending_pc.eq(controller.pending_pc),
            trace.drained_opcode.eq(controller.drained_opcode),
            trace.opcode.eq(fetch.instruction.opcode),
            trace.port_read_bytes.eq(self.port_read_bytes),
            trace.write_bytes.eq(self.write_bytes),
            trace.index.eq(ctrl.trace_index),
            ctrl.trace_entry.eq(trace.entry),
            ctrl.trace_count.eq(trace.count),
        ]
