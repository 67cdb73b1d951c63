"""The controller: the state machine that runs a program one instruction at a time.

``FETCH`` (one instruction, from the fetch's line cache or a line read through the DMA) →
``CHECK1`` / ``CHECK2`` (the instruction checks: sums registered, then compared) → the
instruction's states → ``NEXT``. An instruction ends when its last result is in the
buffer, or its last write response is back — except that a ``GEMM`` with its results in
the buffer hands over as soon as its commands and DDR stream (weights and parameters, or
parameters only) are issued (``pending``): the next instruction is fetched and checked
while the stream arrives and the array computes (the router gives a GEMM's entries
priority), and if it is such a ``GEMM`` too, its command and stream are issued at once,
queued behind the first's, while its buffer walks wait (in a queue of :data:`GEMMS_HELD`
walk plans) for the previous ``GEMM``'s last result: the DDR streams on from one GEMM's
weights into the next's, up to five GEMMs ahead. A held GEMM that reads nothing the one
before it writes (both plain: no fused residual) starts its reads as soon as that one has
taken its last token, and its results' walk when that one's last result is written; one
that reads what the one before writes does too where those results leave N-tile by
N-tile in ascending regions, each read waiting until the write walk has passed its
N-tile (an expert's FC2 beside its FC1's last results). A
failed check stops before anything of the instruction starts; a DDR error lets the
instruction finish, then stops; ``abort_request`` stops after the current instruction.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

from ..axi import dma_cmd_layout
from ..config import AccelConfig
from ..gemm import command_layout
from ..isa import (
    INSTRUCTION,
    ExpertOrder,
    GemmMode,
    GemmOp,
    Opcode,
    RowMode,
    TableUnit,
    WeightSource,
)
from ..moe import Combiner, Dispatcher, slot_layout
from ..registers import ErrorCode, Schedule
from ..vector import LayerNormUnit, ResidualAdd, SoftmaxMode, SoftmaxUnit
from .buffer import GatherMode
from .checks import RANGE_BOUNDS, checks_control
from .datapath import Unit, datapath_control
from .fetch import fetch_control
from .router import ReadSink, intake_shape, read_router_control

__all__ = ["CMD_SEQ_BITS", "GEMMS_HELD", "Controller", "dispatcher_tables"]

#: GEMMs whose streams are issued while their walks wait for the GEMMs before them: with
#: the pending one, the DDR reads up to GEMMS_HELD + 1 GEMMs ahead of the array (an expert
#: visit is two), as far as the read queues hold.
GEMMS_HELD = 4
#: Width of the GEMM command counts (sent by the controller, taken by the engine): more than
#: the commands that can be between the two (the engine's queue, its own two, a few held).
CMD_SEQ_BITS = 5


def dispatcher_tables(config: AccelConfig) -> wiring.Signature:
    """What the controller reads of the dispatcher (its ``EXPERTS`` loop), seen from it.

    Members are the :class:`~m3vit.hw.moe.Dispatcher`'s of the same name: ``list_index``
    (Out) and ``list_expert``, ``list_start``, ``list_count``, ``n_active``, ``rows``,
    ``top_k``, ``slot``, ``busy`` (In).
    """
    entries = config.max_tokens * config.max_top_k
    return wiring.Signature({
        "list_index": Out(range(config.max_experts)),
        "list_expert": In(range(config.max_experts)),
        "list_start": In(range(entries + 1)),
        "list_count": In(range(config.max_tokens + 1)),
        "n_active": In(range(config.max_experts + 1)),
        "rows": In(16),
        "top_k": In(4),
        "slot": In(data.ArrayLayout(slot_layout(config), config.max_top_k)),
        "busy": In(1),
    })


def _walk_layout(cfg: AccelConfig) -> data.StructLayout:
    """One address walk's start values (``walk_signature``'s, without ``start``)."""
    walk = datapath_control(cfg).members["walk_a"].signature.members
    return data.StructLayout({name: walk[name].shape for name in ("base", "count", "stride")})


def _walk_plan_layout(cfg: AccelConfig) -> data.StructLayout:
    """Everything that starts a GEMM's buffer walks: the three walks (``w``, ``b`` used or
    not), the result count, the gather stage's mode and offset, a fused residual add (its
    flag and the residual unit's command), where its weights come from (``from_buffer``,
    ``columns``), ``early``: its reads may start before the GEMM before it has written
    its last result (:meth:`Controller._launch_held_walks`), ``gate`` and ``gate_last``:
    they read that GEMM's results, up to ``gate_last``, each N-tile once written,
    ``skip_keyless``: its result words past its keys are not written (Q·Kᵀ,
    ``datapath_control``), ``early_b``: its weights come from the buffer, outside that
    GEMM's results, and may load while that GEMM still takes tokens, once the engine has
    taken the ``cmd_seq``-th GEMM command (its own)."""
    walk = _walk_layout(cfg)
    entries = cfg.max_tokens * cfg.max_top_k
    return data.StructLayout({"a": walk, "w": walk, "b": walk, "use_w": 1, "use_b": 1,
                              "writes": 32, "gather_mode": GatherMode,
                              "gather_offset": range(entries + 1),
                              "residual": 1, "res_cmd": ResidualAdd.cmd_layout(cfg),
                              "from_buffer": 1, "columns": 1, "early": 1,
                              "gate": 1, "gate_last": ceil_log2(cfg.act_buffer_words),
                              "skip_keyless": 1, "early_b": 1, "cmd_seq": CMD_SEQ_BITS})


class _Registers:
    """The controller's state besides its state machine (one instance per elaboration)."""

    def __init__(self, cfg: AccelConfig):
        entries = cfg.max_tokens * cfg.max_top_k
        self.pc = Signal(32)
        self.task_stride = Signal(32)
        self.task_offset = Signal(64)
        self.stop_code = Signal(ErrorCode)
        self.aborting = Signal()
        # Handshakes done in the current issue state (one bit each).
        self.sent = Signal(4)
        self.sink = Signal(ReadSink)
        self.unit = Signal(Unit)
        self.gemm_int32 = Signal()
        self.weights_from_buffer = Signal()
        self.weights_columns = Signal()         # ... column by column (BUFFER_COLUMNS)
        # MoE: the EXPERTS loop and the context of its current iteration.
        self.routed = Signal()                  # a ROUTE has completed in this run
        self.run_schedule = Signal(Schedule)    # SCHEDULE.ORDER, sampled at start
        self.loop_active = Signal()
        self.loop_first = Signal(32)            # pc of the body's first / last instruction
        self.loop_last = Signal(32)
        self.loop_tbt = Signal()                # token-by-token order
        self.loop_stride = Signal(32)           # EXPERTS.stride
        self.loop_index = Signal(range(cfg.max_experts))   # expert-by-expert: list position
        self.loop_token = Signal(16)            # token-by-token: token t and choice j
        self.loop_choice = Signal(range(cfg.max_top_k))
        self.ctx_expert = Signal(range(cfg.max_experts))
        self.ctx_offset = Signal(range(entries + 1))
        self.ctx_count = Signal(range(cfg.max_tokens + 1))
        self.expert_offset = Signal(48)         # ctx_expert · loop_stride
        self.gather_mode = Signal(GatherMode)
        self.gather_offset = Signal(range(entries + 1))   # the context of the GEMM walked
        # Weight prefetch across GEMMs: a GEMM whose stream is in still owns the array.
        self.pending = Signal()
        self.pending_pc = Signal(32)           # the pending GEMM's index
        self.drain_to_fetch = Signal()
        # The walks of GEMMs whose streams are issued, waiting for the GEMM before them
        # (a queue of GEMMS_HELD plans, made in elaborate): each starts when the one before
        # has written its last result, and the controller goes on meanwhile.
        self.launcher = None
        # The held GEMM at the launcher's head has started its reads (``early``) and waits
        # only for the results' walk; the results range of the last GEMM accepted and
        # whether it was plain (no fused residual).
        self.reads_early = Signal()
        # ... has started its port B walk (its weights from the buffer, ``early_b``).
        self.b_early = Signal()
        # GEMM commands sent to the engine's queue (mod 2^CMD_SEQ_BITS).
        self.gemm_cmds_sent = Signal(CMD_SEQ_BITS)
        buf_bits = ceil_log2(cfg.act_buffer_words)
        self.prev_used = Signal()
        self.prev_first = Signal(buf_bits)
        self.prev_last = Signal(buf_bits)
        self.prev_plain = Signal()
        # Its result words leave N-tile by N-tile in disjoint, ascending regions (its tokens
        # fit its stride): a GEMM reading them may start beside it, gated by the write walk.
        self.prev_ordered = Signal()
        # The held GEMM's early reads wait for the GEMM before's results up to this address
        # (``Datapath`` ``read_gate``) until that GEMM has written its last.
        self.read_gate = Signal()
        self.read_gate_last = Signal(buf_bits)
        # A fused residual add (GEMM or COMBINE with ``residual``): the datapath's routing,
        # and the residual unit's command, offered until taken.
        self.residual_fused = Signal()
        # The results being written are Q·Kᵀ's: words past its keys are not written.
        self.skip_keyless = Signal()
        self.res_cmd = Signal(ResidualAdd.cmd_layout(cfg))
        self.res_cmd_valid = Signal()
        # A SOFTMAX runs in the background (its own read port and write walk): the
        # controller goes on, and an instruction waits for it (BG_WAIT) unless it is a
        # GEMM whose buffer ranges do not touch the softmax's.
        self.bg_busy = Signal()
        self.bg_pc = Signal(32)
        self.bg_read = Signal(RANGE_BOUNDS)     # its logits
        self.bg_write = Signal(RANGE_BOUNDS)    # its probabilities
        self.bg_to_fetch = Signal()
        self.bg_drained = Signal()              # (comb) it ends while BG_WAIT waits


class Controller(wiring.Component):
    """The engine's state machine: fetch, check and run each instruction of a program.

    Parameters
    ----------
    config : AccelConfig
        The PE array (GEMM geometry), the AXI width (DMA beats) and the capacities.

    Attributes
    ----------
    start, abort_request : In(1)
        One-cycle requests from the register file.
    data_base : In(64)
        ``DATA_BASE``: every DDR offset of the program is added to it.
    task_select : In(8)
        ``TASK_SELECT``.
    schedule : In(Schedule)
        ``SCHEDULE.ORDER`` (sampled at start).
    busy, done, error, error_code, error_pc : Out
        The run's status (:class:`~m3vit.hw.registers.EngineControlSignature`).
    retired : Out(1)
        An instruction retires this cycle (the ``INSTRUCTIONS`` counter).
    drained : Out(1)
        A GEMM that handed over early (``pending``) finished this cycle while an
        instruction waited for it (``GEMM_DRAIN``), or a background softmax did
        (``BG_WAIT``): the end of its tail, for the trace.
    pending_pc : Out(32)
        That instruction's index.
    drained_opcode : Out(8)
        Its opcode (``GEMM`` or ``SOFTMAX``).
    fetch : Out(fetch_control())
        The instruction fetch; ``instruction`` is what it fetched.
    instruction : In(INSTRUCTION)
        The current instruction.
    checks : Out(checks_control(config))
        The instruction checks: the iteration's context in, the verdicts out.
    router : Out(read_router_control())
        Where the read DMA's data goes, and the stream bookkeeping.
    datapath : Out(datapath_control(config))
        The buffer walks and the unit its ports serve.
    dispatcher : Out(dispatcher_tables(config))
        The dispatcher's active list, slots and status (the ``EXPERTS`` loop).
    rd_cmd, wr_cmd : Out(stream.Signature(dma_cmd_layout(config)))
        Operand reads (to the router) and writes (to the write DMA).
    wr_idle, dma_error : In(1)
        The write DMA has nothing outstanding; a DMA saw SLVERR / DECERR.
    dma_error_clear : Out(1)
        Pulsed at the start of a run.
    gemm_cmd, ln_cmd, softmax_cmd, residual_cmd, dispatcher_cmd, combiner_cmd : Out(stream)
        The units' commands (their ``command`` / ``cmd`` streams).
    gemm_busy, softmax_busy : In(1)
        The GEMM engine and the softmax unit are busy.
    gemm_cmds_taken : In(CMD_SEQ_BITS)
        Commands the GEMM engine itself has taken from its command queue (mod
        2^CMD_SEQ_BITS): it takes one once every weight tile of the one before has loaded.
    """

    def __init__(self, config: AccelConfig):
        self.config = config
        dma_cmd = stream.Signature(dma_cmd_layout(config))
        super().__init__({
            "start": In(1),
            "abort_request": In(1),
            "data_base": In(64),
            "task_select": In(8),
            "schedule": In(Schedule),
            "busy": Out(1),
            "done": Out(1),
            "error": Out(1),
            "error_code": Out(ErrorCode),
            "error_pc": Out(32),
            "retired": Out(1),
            "drained": Out(1),
            "pending_pc": Out(32),
            "drained_opcode": Out(8),
            "fetch": Out(fetch_control()),
            "instruction": In(INSTRUCTION),
            "checks": Out(checks_control(config)),
            "router": Out(read_router_control()),
            "datapath": Out(datapath_control(config)),
            "dispatcher": Out(dispatcher_tables(config)),
            "rd_cmd": Out(dma_cmd),
            "wr_cmd": Out(dma_cmd),
            "wr_idle": In(1),
            "dma_error": In(1),
            "dma_error_clear": Out(1),
            "gemm_cmd": Out(stream.Signature(command_layout(config))),
            "ln_cmd": Out(stream.Signature(LayerNormUnit.cmd_layout(config))),
            "softmax_cmd": Out(stream.Signature(SoftmaxUnit.cmd_layout(config))),
            "residual_cmd": Out(stream.Signature(ResidualAdd.cmd_layout(config))),
            "dispatcher_cmd": Out(stream.Signature(Dispatcher.cmd_layout(config))),
            "combiner_cmd": Out(stream.Signature(Combiner.cmd_layout(config))),
            "gemm_busy": In(1),
            "softmax_busy": In(1),
            "gemm_cmds_taken": In(CMD_SEQ_BITS),
        })

    def elaborate(self, platform):
        m = Module()
        r = _Registers(self.config)
        checks, datapath = self.checks, self.datapath
        plan_layout = _walk_plan_layout(self.config)
        r.launcher = m.submodules.launcher = SyncFIFOBuffered(width=plan_layout.size,
                                                              depth=GEMMS_HELD)
        with m.If(self.gemm_cmd.valid & self.gemm_cmd.ready):
            m.d.sync += r.gemm_cmds_sent.eq(r.gemm_cmds_sent + 1)
        m.d.comb += [
            self.error_code.eq(r.stop_code),
            self.error_pc.eq(r.pc),
            self.fetch.pc.eq(r.pc),
            self.router.sink.eq(r.sink),
            datapath.unit.eq(r.unit),
            datapath.gemm_int32.eq(r.gemm_int32),
            datapath.weights_from_buffer.eq(r.weights_from_buffer),
            datapath.weights_columns.eq(r.weights_columns),
            datapath.gather_mode.eq(r.gather_mode),
            datapath.gather_offset.eq(r.gather_offset),
            datapath.residual_fused.eq(r.residual_fused),
            datapath.skip_keyless.eq(r.skip_keyless),
            datapath.read_gate.eq(r.read_gate),
            datapath.read_gate_last.eq(r.read_gate_last),
            checks.loop_active.eq(r.loop_active),
            checks.routed.eq(r.routed),
            checks.ctx_count.eq(r.ctx_count),
            checks.ctx_offset.eq(r.ctx_offset),
            checks.expert_offset.eq(r.expert_offset),
            checks.task_offset.eq(r.task_offset),
        ]
        plan = self._gemm_walk_plan(m, r)
        # The trace's drain entries: a pending GEMM's (GEMM_DRAIN) or the background
        # softmax's (BG_WAIT), never in the same cycle.
        bg_drained = r.bg_drained
        m.d.comb += [
            self.pending_pc.eq(Mux(bg_drained, r.bg_pc, r.pending_pc)),
            self.drained_opcode.eq(Mux(bg_drained, Opcode.SOFTMAX.value, Opcode.GEMM.value)),
        ]
        with m.If(bg_drained):
            m.d.comb += self.drained.eq(1)
        with m.FSM(name="fsm"):
            self._run_states(m, r)
            self._gemm_states(m, r, plan)
            self._vector_states(m, r)
            self._memory_states(m, r)
            self._moe_states(m, r)
            self._end_states(m, r)
        self._launch_held_walks(m, r)
        # The background softmax is done once its last probability is written.
        with m.If(r.bg_busy & self.datapath.bg_writes_done):
            m.d.sync += r.bg_busy.eq(0)
        # After the state machine: this command wins over RESIDUAL_RUN's, which never runs
        # while one is offered (a fused GEMM drains before any other instruction starts).
        with m.If(r.res_cmd_valid):
            m.d.comb += [self.residual_cmd.valid.eq(1), self.residual_cmd.payload.eq(r.res_cmd)]
            with m.If(self.residual_cmd.ready):
                m.d.sync += r.res_cmd_valid.eq(0)
        with m.If(self.abort_request & self.busy):
            m.d.sync += r.aborting.eq(1)
        return m

    # Helpers of the states: each adds statements to the state it is called in.

    def _walk(self, m: Module, walk, base, *loops) -> None:
        """Start ``walk`` at ``base`` over ``loops`` = (count, stride) pairs, outer first."""
        loops = [(1, 0)] * (3 - len(loops)) + list(loops)
        m.d.comb += [walk.start.eq(1), walk.base.eq(base)]
        for level, (count, stride) in enumerate(loops):
            m.d.comb += [walk.count[level].eq(count), walk.stride[level].eq(stride)]

    def _command(self, m: Module, r: _Registers, port, bit: int, **fields) -> None:
        """Offer one command beat on ``port`` until taken (``sent[bit]`` records it)."""
        with m.If(~r.sent[bit]):
            m.d.comb += port.valid.eq(1)
            m.d.comb += [port.payload[name].eq(value) for name, value in fields.items()]
            with m.If(port.ready):
                m.d.sync += r.sent[bit].eq(1)

    def _stop(self, m: Module, r: _Registers, code: ErrorCode) -> None:
        m.d.sync += r.stop_code.eq(code)
        m.next = "STOP_ERROR"

    def _expect_writes(self, m: Module, count) -> None:
        """The write port is to take ``count`` words (the instruction ends when it has)."""
        m.d.comb += [self.datapath.expect_writes.eq(1), self.datapath.writes.eq(count)]

    def _ddr_addr(self):
        return self.data_base + self.checks.ddr_offset

    def _ddr_beats(self):
        return self.checks.ddr_bytes >> exact_log2(self.config.axi_bytes)

    def _run_states(self, m: Module, r: _Registers) -> None:
        """IDLE, FETCH, the checks and the dispatch on the opcode; TASKS."""
        checks = self.checks
        op = self.instruction.opcode
        with m.State("IDLE"):
            with m.If(self.start):
                m.d.sync += [r.pc.eq(0), r.stop_code.eq(ErrorCode.NONE), r.aborting.eq(0),
                             r.task_offset.eq(0), r.task_stride.eq(0), r.sent.eq(0),
                             r.routed.eq(0), r.loop_active.eq(0),
                             r.run_schedule.eq(self.schedule), r.pending.eq(0),
                             r.residual_fused.eq(0), r.res_cmd_valid.eq(0),
                             r.bg_busy.eq(0), r.reads_early.eq(0), r.prev_used.eq(0),
                             r.read_gate.eq(0), r.b_early.eq(0)]
                m.d.comb += [self.dma_error_clear.eq(1), self.fetch.flush.eq(1)]
                m.next = "FETCH"
        with m.State("FETCH"):
            m.d.comb += self.busy.eq(1)
            with m.If(r.bg_busy & (r.aborting | self.dma_error)):
                m.d.sync += r.bg_to_fetch.eq(1)
                m.next = "BG_WAIT"
            with m.Elif(r.pending & (r.aborting | self.dma_error)):
                m.d.sync += r.drain_to_fetch.eq(1)
                m.next = "GEMM_DRAIN"
            with m.Elif(r.aborting):
                self._stop(m, r, ErrorCode.ABORTED)
            with m.Elif(self.dma_error):
                self._stop(m, r, ErrorCode.AXI_RESPONSE)
            with m.Else():
                m.d.comb += self.fetch.request.eq(1)
                with m.If(self.fetch.issued):
                    m.d.sync += r.sink.eq(ReadSink.FETCH)
                    m.next = "FETCH_DATA"
        with m.State("FETCH_DATA"):
            m.d.comb += [self.busy.eq(1), self.fetch.collect.eq(1)]
            with m.If(self.fetch.done):
                m.d.sync += r.sink.eq(ReadSink.NONE)
                m.next = "CHECK1"
        with m.State("CHECK1"):
            m.d.comb += [self.busy.eq(1), checks.register_sums.eq(1)]
            m.next = "CHECK2"
        with m.State("CHECK2"):
            m.d.comb += self.busy.eq(1)
            ok = checks.opcode_ok & checks.shape_ok & checks.buffer_ok & checks.ddr_ok
            with m.If(r.bg_busy & ~(ok & (op == Opcode.GEMM) & ~self._bg_hazard(r))):
                # Only a GEMM clear of the background softmax's buffer ranges runs beside
                # it; anything else (a failing check's stop included) waits for it.
                m.d.sync += r.bg_to_fetch.eq(0)
                m.next = "BG_WAIT"
            with m.Elif(r.pending):
                # A GEMM is still finishing: a GEMM with buffer results may start beside
                # it, and a LayerNorm's parameter read (a unit the GEMM does not use) goes
                # on behind its stream; anything else waits. (A table load could too, but
                # it would retire before the GEMM's drain and take the GEMM's time in the
                # trace.)
                with m.If(ok & (op == Opcode.GEMM) & self._hands_over()):
                    m.d.sync += r.sent.eq(0)
                    m.next = "GEMM_PREFETCH"
                with m.Elif(ok & (op == Opcode.LAYERNORM)):
                    m.d.sync += r.sent.eq(0)
                    m.next = "LN_PARAMS"     # its walks wait for the drain
                with m.Else():
                    m.d.sync += r.drain_to_fetch.eq(0)
                    m.next = "GEMM_DRAIN"
            with m.Elif(~checks.opcode_ok):
                self._stop(m, r, ErrorCode.ILLEGAL_OPCODE)
            with m.Elif(~checks.shape_ok):
                self._stop(m, r, ErrorCode.SHAPE_OVER_CAPACITY)
            with m.Elif(~checks.buffer_ok | ~checks.ddr_ok):
                self._stop(m, r, ErrorCode.ADDRESS_OUT_OF_RANGE)
            with m.Else():
                m.d.sync += r.sent.eq(0)
                with m.Switch(op):
                    for opcode, state in _FIRST_STATE.items():
                        with m.Case(opcode):
                            m.next = state
        with m.State("BG_WAIT"):
            m.d.comb += self.busy.eq(1)
            with m.If(self.datapath.bg_writes_done):
                m.d.comb += r.bg_drained.eq(1)
                m.next = "CHECK2"
                with m.If(r.bg_to_fetch):
                    m.next = "FETCH"
        with m.State("TASKS"):
            tasks = self.instruction.args.tasks
            m.d.comb += self.busy.eq(1)
            with m.If(self.task_select >= tasks.count):
                self._stop(m, r, ErrorCode.BAD_TASK)
            with m.Else():
                m.d.sync += [r.task_stride.eq(tasks.stride),
                             r.task_offset.eq(self.task_select * tasks.stride)]
                m.next = "NEXT"

    def _bg_hazard(self, r: _Registers) -> Value:
        """The checked instruction (a ``GEMM``) reads what the background softmax writes,
        or writes what it reads or writes (ranges 0 and 2 are a GEMM's reads, 1 its
        results)."""
        ranges = self.checks.ranges

        def overlap(a, b):
            return a.used & b.used & (a.first <= b.last) & (b.first <= a.last)

        return (overlap(ranges[0], r.bg_write) | overlap(ranges[2], r.bg_write)
                | overlap(ranges[1], r.bg_read) | overlap(ranges[1], r.bg_write))

    def _hands_over(self):
        """The instruction is a GEMM with results in the buffer (not INT32): it may hand
        over to the next instruction once its commands and DDR stream (weights and
        parameters, or parameters only) are issued."""
        return self.instruction.args.gemm.mode != GemmMode.INT32

    def _plain(self) -> Value:
        """The GEMM adds no residual: its reads are its walks A and B alone, in the ranges
        checked, and start together (a fused residual's x is read through port B beside
        the results, so it starts with the results' walk).

        Gathered rows and ``EXPERTS`` bodies are plain: the gather stage sits on port A's
        addresses, idle once the GEMM before has taken its last token, and a visit's
        ranges (its context's queue rows, the routed rows it gathers) are checked as any
        other. On ``edge-moe`` the next expert's FC1, which gathers from LN2's output,
        thus starts beside the FC2 before it, which reads FC1's scratch and writes the
        queue rows."""
        return ~self.instruction.args.gemm.residual

    def _hits(self, r: _Registers, rng) -> Value:
        """The checked range ``rng`` meets what the GEMM accepted before writes. Checked
        ranges lie in the buffer, so their low bits compare."""
        bits = len(r.prev_first)
        return (rng.used & r.prev_used & (rng.first[:bits] <= r.prev_last)
                & (r.prev_first <= rng.last[:bits]))

    def _reads_hit(self, r: _Registers) -> Value:
        """The checked GEMM reads (activations or buffer weights) what the GEMM accepted
        before it writes."""
        ranges = self.checks.ranges
        return self._hits(r, ranges[0]) | self._hits(r, ranges[2])

    def _reads_early(self, r: _Registers) -> Value:
        """The checked GEMM and the GEMM accepted before it are both plain, and it reads
        nothing that one writes, or that one's results leave in ordered N-tiles: its reads
        may start as soon as that one's have ended (its ``early``), in the second case
        gated by that one's write walk (its ``gate``)."""
        return self._plain() & r.prev_plain & (~self._reads_hit(r) | r.prev_ordered)

    def _weights_early(self, r: _Registers) -> Value:
        """Besides :meth:`_reads_early`, the checked GEMM's weights come from the buffer,
        where the GEMM before writes none of its results: port B may walk them as soon as
        that GEMM's weights have all loaded — once the engine itself has taken this GEMM's
        command from its queue (its loader takes a command only after the last tile of the
        one before: ``gemm_cmds_taken``) — while that GEMM's last tokens still enter the
        array."""
        g = self.instruction.args.gemm
        return (self._reads_early(r) & (g.wsrc != WeightSource.DDR)
                & ~self._hits(r, self.checks.ranges[2]))

    def _accepted(self, m: Module, r: _Registers) -> None:
        """Remember the GEMM's results range and plainness for the one after it."""
        out = self.checks.ranges[1]
        bits = len(r.prev_first)
        g = self.instruction.args.gemm
        m.d.sync += [r.prev_used.eq(out.used), r.prev_first.eq(out.first[:bits]),
                     r.prev_last.eq(out.last[:bits]), r.prev_plain.eq(self._plain()),
                     # An N-tile's words of token t lie at t + v·dst_stride (v < 2V):
                     # tokens ≤ dst_stride keeps each N-tile below the next.
                     r.prev_ordered.eq(self.checks.tokens <= g.dst_stride)]

    def _gemm_setup(self, m: Module, r: _Registers) -> None:
        """The GEMM's unit, sink and DDR stream (sent to the router)."""
        cfg = self.config
        entry_bytes = intake_shape(cfg).entry_bytes
        g = self.instruction.args.gemm
        m.d.sync += [
            r.unit.eq(Unit.GEMM),
            r.sink.eq(ReadSink.GEMM),
            r.gemm_int32.eq(g.mode == GemmMode.INT32),
        ]
        m.d.comb += [
            self.router.gemm_setup.eq(1),
            self.router.gemm_weights_ddr.eq(g.wsrc == WeightSource.DDR),
            self.router.gemm_tile_entries.eq((g.k_slices * (cfg.pe_rows * cfg.gemm_cols))
                                             >> exact_log2(entry_bytes)),
            # A GEMM's stream is whole entries (parameter blocks and tiles are).
            self.router.gemm_entries.eq(self.checks.ddr_bytes >> exact_log2(entry_bytes)),
        ]

    def _gemm_walk_plan(self, m: Module, r: _Registers) -> Signal:
        """The current GEMM's buffer walks (activations, results, weights from the buffer),
        its result count and gather settings, as a plan to start now or later.

        The plan is one ``Cat`` in one statement: driven field by field, its constant
        fields would become ``always @*`` blocks without inputs, which Verilator never
        runs (``docs/toolchain.md``).
        """
        R, G, V = self.config.pe_rows, self.config.gemm_cols, self.config.gemm_words
        log_words = exact_log2(V)
        g = self.instruction.args.gemm
        tokens = self.checks.tokens
        layout = _walk_plan_layout(self.config)
        walk_layout = _walk_layout(self.config)
        plan = Signal(layout)

        def fit(value, width):
            value = Value.cast(value)
            return value[:width] if len(value) >= width else Cat(value,
                                                                 Const(0, width - len(value)))

        def walk(base, *loops):
            loops = [(1, 0)] * (3 - len(loops)) + list(loops)
            count_bits = walk_layout["count"].shape.elem_shape.width
            stride_bits = walk_layout["stride"].shape.elem_shape.width
            return Cat(fit(base, walk_layout["base"].width),
                       *(fit(count, count_bits) for count, _ in loops),
                       *(fit(stride, stride_bits) for _, stride in loops))

        src_base = g.src + Mux(g.src_rows == RowMode.QUEUE, r.ctx_offset, 0)
        dst_base = g.dst + Mux(g.dst_rows == RowMode.QUEUE, r.ctx_offset, 0)
        # An N-tile is V = gemm_words buffer words wide: a weight row from the buffer is V
        # words side by side (one a slice of wstride apart), a token's results V words
        # (dst_stride apart), in that order within the row or token.
        walk_b = Mux(g.wsrc == WeightSource.BUFFER_COLUMNS,
                     walk(g.wbuf, (g.n_tiles, G), (g.k_slices, g.wstride), (G, 1)),
                     walk(g.wbuf, (g.n_tiles, g.wstride << log_words),
                          (g.k_slices << exact_log2(R), 1), (V, g.wstride)))
        # A fused residual's x is read where the results are written, from wbuf.
        res_base = g.wbuf + Mux(g.dst_rows == RowMode.QUEUE, r.ctx_offset, 0)
        walk_b = Mux(g.residual, walk(res_base, (g.n_tiles, g.dst_stride << log_words),
                                      (tokens, 1), (V, g.dst_stride)), walk_b)
        gather = Mux(g.src_rows == RowMode.GATHER, GatherMode.QUEUE, GatherMode.NONE)
        # INT16 results: 2V words a token and N-tile (a token's words still side by side).
        wide = g.mode == GemmMode.INT16
        log_out = log_words + wide
        writes = fit((g.n_tiles * tokens) << log_out, 32)
        res_cmd = layout["res_cmd"].shape
        m.d.comb += plan.eq(Cat(
            walk(src_base, (g.n_tiles, 0), (g.k_slices, g.src_stride),
                 (tokens, 1)),
            walk(dst_base, (g.n_tiles, g.dst_stride << log_out), (tokens, 1),
                 (Mux(wide, 2 * V, V), g.dst_stride)),
            walk_b,
            g.mode != GemmMode.INT32,
            (g.wsrc != WeightSource.DDR) | g.residual,
            writes,
            fit(gather, layout["gather_mode"].width),
            fit(r.ctx_offset, layout["gather_offset"].width),
            g.residual,
            # The residual unit: a beat a result word (the checks bound the count).
            fit(writes, res_cmd["beats"].width), g.res_mult_out, g.res_mult_buf,
            fit(g.res_shift, res_cmd["shift"].width),
            g.wsrc != WeightSource.DDR, g.wsrc == WeightSource.BUFFER_COLUMNS,
            self._reads_early(r), self._reads_hit(r), r.prev_last,
            # Q·Kᵀ's INT8 results: words past its keys are not written.
            (g.wsrc == WeightSource.BUFFER_COLUMNS) & ~g.residual
            & ((g.mode == GemmMode.INT8) | (g.mode == GemmMode.INT8_TABLE)),
            self._weights_early(r), r.gemm_cmds_sent))
        assert len(Cat(plan.as_value())) == layout.size
        return plan

    @staticmethod
    def _start_walk(m: Module, port, target, used) -> None:
        m.d.comb += [port.start.eq(used), port.base.eq(target.base),
                     port.count.eq(target.count), port.stride.eq(target.stride)]

    def _start_reads(self, m: Module, r: _Registers, plan, b: bool | Value = True) -> None:
        """Start a GEMM's read walks from ``plan``: A, with the routing of port A (gather),
        and where ``b``, B when used, with the routing of its words (weights from the
        buffer)."""
        m.d.sync += [r.gather_offset.eq(plan.gather_offset),
                     r.gather_mode.eq(plan.gather_mode)]
        self._start_walk(m, self.datapath.walk_a, plan.a, 1)
        if b is True:
            self._start_reads_b(m, r, plan)
        else:
            with m.If(b):
                self._start_reads_b(m, r, plan)

    def _start_reads_b(self, m: Module, r: _Registers, plan) -> None:
        """Start a GEMM's port B walk (when used) and the routing of its words."""
        m.d.sync += [r.weights_from_buffer.eq(plan.from_buffer),
                     r.weights_columns.eq(plan.columns)]
        self._start_walk(m, self.datapath.walk_b, plan.b, plan.use_b)

    def _start_writes(self, m: Module, r: _Registers, plan) -> None:
        """Start a GEMM's results walk and count, and its fused residual add."""
        self._expect_writes(m, plan.writes)
        m.d.sync += [r.residual_fused.eq(plan.residual), r.skip_keyless.eq(plan.skip_keyless)]
        with m.If(plan.residual):
            m.d.sync += [r.res_cmd.eq(plan.res_cmd), r.res_cmd_valid.eq(1)]
        self._start_walk(m, self.datapath.walk_w, plan.w, plan.use_w)

    def _start_walks(self, m: Module, r: _Registers, plan) -> None:
        """Start a GEMM's buffer walks from ``plan`` (:meth:`_gemm_walk_plan`)."""
        self._start_reads(m, r, plan)
        self._start_writes(m, r, plan)

    def _launch_held_walks(self, m: Module, r: _Registers) -> None:
        """The held GEMM's walks start as soon as the GEMM before it has written its last
        result (after the state machine: nothing else starts walks while one is held);
        with ``early``, its reads start before that, once the GEMM before it has taken its
        last token: its first weight tile loads and its first tokens enter the array
        while that GEMM's last results leave, which hold its own until their walk starts.
        With ``gate`` its reads of that GEMM's results wait at the ports, each until the
        write walk has left the N-tile it lies in (``Datapath`` ``read_gate``). With
        ``early_b`` its weights' walk on port B starts earlier still, once the engine has
        taken its command (every tile of the GEMM before has loaded then): its first tile
        loads while that GEMM's last tokens enter the array.
        """
        head = _walk_plan_layout(self.config)(r.launcher.r_data)
        with m.If(r.launcher.r_rdy):
            with m.If(self.datapath.writes_done):
                with m.If(~r.reads_early):
                    self._start_reads(m, r, head, b=~r.b_early)
                self._start_writes(m, r, head)
                m.d.comb += r.launcher.r_en.eq(1)
                m.d.sync += [r.reads_early.eq(0), r.read_gate.eq(0), r.b_early.eq(0)]
            with m.Elif(head.early & ~r.reads_early & self.datapath.gemm_inputs_done):
                self._start_reads(m, r, head, b=~r.b_early)
                m.d.sync += [r.reads_early.eq(1), r.read_gate.eq(head.gate),
                             r.read_gate_last.eq(head.gate_last)]
            with m.Elif(head.early_b & ~r.reads_early & ~r.b_early
                        & (self.gemm_cmds_taken == head.cmd_seq)):
                self._start_reads_b(m, r, head)
                m.d.sync += r.b_early.eq(1)

    def _gemm_commands(self, m: Module, r: _Registers):
        """Issue the GEMM's commands; true once all are taken."""
        G = self.config.gemm_cols
        g = self.instruction.args.gemm
        tokens = self.checks.tokens
        wide = g.mode == GemmMode.INT16
        # The engine runs INT16 results as INT8 with its command's `wide` bit.
        self._command(m, r, self.gemm_cmd, 0, op=Mux(wide, GemmOp.INT8, g.mode.as_value()),
                      wide=wide, tokens=tokens, k_slices=g.k_slices, n_tiles=g.n_tiles,
                      transposed=g.wsrc == WeightSource.BUFFER_COLUMNS, row_scale=g.row_scale)
        self._command(m, r, self.rd_cmd, 1, addr=self._ddr_addr(), beats=self._ddr_beats())
        with m.If(g.mode == GemmMode.INT32):
            self._command(m, r, self.wr_cmd, 2, addr=self.data_base + g.out_ddr,
                          beats=(g.n_tiles * tokens * (4 * G))
                          >> exact_log2(self.config.axi_bytes))
        with m.Else():
            m.d.sync += r.sent[2].eq(1)
        return r.sent[0] & r.sent[1] & r.sent[2]

    def _drain_ready(self, r: _Registers) -> Value:
        """The pending GEMM (and any held behind it) has written its last result."""
        return (~self.gemm_busy & ~self.gemm_cmd.valid & self.datapath.writes_done
                & ~r.launcher.r_rdy)

    def _drain(self, m: Module, r: _Registers) -> None:
        """The pending GEMM is done (:meth:`_drain_ready`): it gives up the datapath."""
        m.d.comb += self.drained.eq(1)
        m.d.sync += [r.pending.eq(0), r.unit.eq(Unit.NONE),
                     r.gather_mode.eq(GatherMode.NONE), r.residual_fused.eq(0)]

    def _gemm_states(self, m: Module, r: _Registers, plan) -> None:
        """GEMM: command, DDR stream, address walks, then wait for the results; the
        prefetch of a GEMM beside a pending one."""
        datapath = self.datapath
        with m.State("GEMM_START"):
            m.d.comb += self.busy.eq(1)
            self._gemm_setup(m, r)
            self._start_walks(m, r, plan)
            self._accepted(m, r)
            m.next = "GEMM_ISSUE"
        with m.State("GEMM_ISSUE"):
            m.d.comb += self.busy.eq(1)
            with m.If(self._gemm_commands(m, r)):
                m.next = "GEMM_WAIT"
                with m.If(self._hands_over()):
                    m.next = "GEMM_STREAM"
        # Beside a pending GEMM: stream setup, commands, then its walks are held until the
        # GEMM before it is done, while the controller goes on to the next instruction.
        with m.State("GEMM_PREFETCH"):
            m.d.comb += self.busy.eq(1)
            # Its stream queues behind the pending GEMMs' in the router
            # (GEMM_STREAMS_QUEUED: it may wait for room).
            with m.If(self.router.gemm_stream_room):
                self._gemm_setup(m, r)
                m.next = "GEMM_PREFETCH_ISSUE"
        with m.State("GEMM_PREFETCH_ISSUE"):
            m.d.comb += self.busy.eq(1)
            with m.If(self._gemm_commands(m, r)):
                m.next = "GEMM_HOLD"
        with m.State("GEMM_HOLD"):
            m.d.comb += self.busy.eq(1)
            with m.If(r.launcher.w_rdy):
                m.d.comb += [r.launcher.w_data.eq(plan.as_value()), r.launcher.w_en.eq(1)]
                self._accepted(m, r)
                m.next = "GEMM_STREAM"
        with m.State("GEMM_STREAM"):
            # The stream is under way: the next instruction may be fetched and, if it is a
            # GEMM with buffer results too, its stream issued behind this one (the router hands a
            # GEMM's entries to it first), while the array computes.
            m.d.comb += self.busy.eq(1)
            m.d.sync += [r.pending.eq(1), r.pending_pc.eq(r.pc)]
            m.next = "NEXT"
        with m.State("GEMM_DRAIN"):
            m.d.comb += self.busy.eq(1)
            with m.If(self._drain_ready(r)):
                self._drain(m, r)
                m.next = "CHECK2"
                with m.If(r.drain_to_fetch):
                    m.next = "FETCH"
        with m.State("GEMM_WAIT"):
            m.d.comb += self.busy.eq(1)
            # INT8: every result word written; INT32: every write answered.
            with m.If(~self.gemm_busy & ~self.gemm_cmd.valid
                      & (r.gemm_int32 | datapath.writes_done)
                      & self.wr_idle & datapath.int32_drained & ~self.router.data_waiting):
                m.next = "NEXT"

    def _vector_states(self, m: Module, r: _Registers) -> None:
        """LAYERNORM (parameters first), SOFTMAX and RESIDUAL."""
        args = self.instruction.args
        walks = self.datapath
        sm_beats, sm_out_beats = self.checks.softmax_beats, self.checks.softmax_out_beats
        with m.State("LN_PARAMS"):
            # The count restarts until the read is issued, never after: its first record
            # may arrive the cycle after (sent is a register, so this state lasts one more).
            m.d.comb += [self.busy.eq(1), self.router.ln_restart.eq(~r.sent[0])]
            m.d.sync += r.sink.eq(ReadSink.LN)
            self._command(m, r, self.rd_cmd, 0, addr=self._ddr_addr(), beats=self._ddr_beats())
            with m.If(r.sent[0]):
                m.next = "LN_PARAMS_WAIT"
        with m.State("LN_PARAMS_WAIT"):
            a = args.layernorm
            m.d.comb += self.busy.eq(1)
            # Begun beside a pending GEMM: its parameters came behind the GEMM's stream;
            # its walks (which read what the GEMM writes) start once that GEMM is done.
            with m.If(r.pending & self._drain_ready(r)):
                self._drain(m, r)
            with m.If((self.router.ln_beats == a.beats) & ~r.pending):
                m.d.sync += [r.sink.eq(ReadSink.NONE), r.sent.eq(0), r.unit.eq(Unit.LN)]
                self._expect_writes(m, a.rows * a.beats)
                self._walk(m, walks.walk_a, a.src, (a.rows, 1), (a.beats, a.stride))
                self._walk(m, walks.walk_w, a.dst, (a.rows, 1), (a.beats, a.stride))
                m.next = "LN_RUN"
        with m.State("LN_RUN"):
            a = args.layernorm
            m.d.comb += self.busy.eq(1)
            self._command(m, r, self.ln_cmd, 0, beats=a.beats, rows=a.rows, shift=a.shift,
                          eps_term=a.eps_term)
            with m.If(r.sent[0] & self.datapath.writes_done):
                m.next = "NEXT"

        # SOFTMAX runs in the background: its walks and command, then the next instruction.
        with m.State("SOFTMAX_START"):
            a = args.softmax
            ranges = self.checks.ranges
            m.d.comb += [self.busy.eq(1), walks.expect_bg_writes.eq(1),
                         walks.bg_writes.eq(a.rows * sm_out_beats)]
            m.d.sync += [r.bg_busy.eq(1), r.bg_pc.eq(r.pc), r.bg_read.eq(ranges[0]),
                         r.bg_write.eq(ranges[1])]
            self._walk(m, walks.walk_c, a.src, (a.rows, 1), (sm_beats, a.stride))
            # Each row: its probabilities, the last word's top lanes (or a word after them)
            # its scale.
            self._walk(m, walks.walk_w2, a.dst, (a.rows, 1), (sm_out_beats, a.stride))
            m.next = "SOFTMAX_RUN"
        with m.State("SOFTMAX_RUN"):
            a = args.softmax
            m.d.comb += self.busy.eq(1)
            self._command(m, r, self.softmax_cmd, 0, length=a.length, rows=a.rows,
                          mode=SoftmaxMode.ATTENTION, mult=a.mult, shift=a.shift)
            with m.If(r.sent[0]):
                m.next = "NEXT"

        with m.State("RESIDUAL_START"):
            a = args.residual
            m.d.comb += self.busy.eq(1)
            m.d.sync += r.unit.eq(Unit.RESIDUAL)
            self._expect_writes(m, a.words)
            for walk, base in ((walks.walk_a, a.src_a), (walks.walk_b, a.src_b),
                               (walks.walk_w, a.dst)):
                self._walk(m, walk, base, (a.words, 1))
            m.next = "RESIDUAL_RUN"
        with m.State("RESIDUAL_RUN"):
            a = args.residual
            m.d.comb += self.busy.eq(1)
            self._command(m, r, self.residual_cmd, 0, beats=a.words, mult_a=a.mult_a,
                          mult_b=a.mult_b, shift=a.shift)
            with m.If(r.sent[0] & self.datapath.writes_done):
                m.next = "NEXT"

    def _memory_states(self, m: Module, r: _Registers) -> None:
        """LOAD, STORE and LOAD_TABLE: DDR to and from the buffer and the tables."""
        args = self.instruction.args
        walks = self.datapath
        word_shift = exact_log2(self.config.pe_cols)
        with m.State("LOAD_START"):
            a = args.load
            m.d.comb += self.busy.eq(1)
            m.d.sync += [r.unit.eq(Unit.LOAD), r.sink.eq(ReadSink.LOAD)]
            self._expect_writes(m, self.checks.ddr_bytes >> word_shift)
            self._walk(m, walks.walk_w, a.dst, (a.words, a.dst_stride))
            m.next = "LOAD_RUN"
        with m.State("LOAD_RUN"):
            m.d.comb += self.busy.eq(1)
            self._command(m, r, self.rd_cmd, 0, addr=self._ddr_addr(), beats=self._ddr_beats())
            with m.If(r.sent[0] & self.datapath.writes_done):
                m.d.sync += r.sink.eq(ReadSink.NONE)
                m.next = "NEXT"

        with m.State("STORE_START"):
            a = args.store
            m.d.comb += [self.busy.eq(1), self.datapath.expect_store.eq(1),
                         self.datapath.store_words.eq(a.words)]
            m.d.sync += r.unit.eq(Unit.STORE)
            # Read whole AXI beats' worth of words; the ones past the count go out as 0.
            self._walk(m, walks.walk_a, a.src, (self.checks.ddr_bytes >> word_shift,
                                                a.src_stride))
            m.next = "STORE_RUN"
        with m.State("STORE_RUN"):
            m.d.comb += self.busy.eq(1)
            self._command(m, r, self.wr_cmd, 0, addr=self._ddr_addr(), beats=self._ddr_beats())
            with m.If(r.sent[0] & self.datapath.store_drained & self.wr_idle):
                m.next = "NEXT"

        with m.State("TABLE_START"):
            a = args.load_table
            m.d.comb += self.busy.eq(1)
            with m.If(a.unit == TableUnit.GEMM):
                self._command(m, r, self.gemm_cmd, 1, op=GemmOp.LOAD_TABLE)
                m.d.sync += r.sink.eq(ReadSink.TABLE8)
            with m.Else():
                m.d.sync += [r.sent[1].eq(1), r.sink.eq(ReadSink.TABLE16)]
                # Not once the read is issued: its first word may arrive the next cycle,
                # still in this state (the table reaches the unit without a register).
                m.d.comb += self.router.table_restart.eq(~r.sent[0])
            self._command(m, r, self.rd_cmd, 0, addr=self._ddr_addr(), beats=self._ddr_beats())
            with m.If(r.sent[0] & r.sent[1]):
                m.next = "TABLE_WAIT"
        with m.State("TABLE_WAIT"):
            unit = args.load_table.unit
            m.d.comb += self.busy.eq(1)
            with m.If(~self.gemm_busy & (unit == TableUnit.GEMM)
                      | self.router.table_done & (unit == TableUnit.SOFTMAX)):
                m.d.sync += r.sink.eq(ReadSink.NONE)
                m.next = "TABLE_END"
        with m.State("TABLE_END"):
            # One cycle so the table sink's last beat is out of the converters.
            m.d.comb += self.busy.eq(1)
            m.next = "NEXT"

    def _moe_states(self, m: Module, r: _Registers) -> None:
        """ROUTE, the EXPERTS loop's context, COMBINE."""
        args = self.instruction.args
        walks = self.datapath
        dispatcher = self.dispatcher
        # ROUTE: logits → softmax (router mode) → dispatcher; the tables are built when the
        # dispatcher goes idle.
        with m.State("ROUTE_START"):
            a = args.route
            m.d.comb += self.busy.eq(1)
            m.d.sync += r.unit.eq(Unit.ROUTE)
            self._walk(m, walks.walk_a, a.src, (a.rows, 1), (self.checks.route_beats, a.stride))
            m.next = "ROUTE_RUN"
        with m.State("ROUTE_RUN"):
            a = args.route
            m.d.comb += self.busy.eq(1)
            self._command(m, r, self.softmax_cmd, 0, length=a.experts, rows=a.rows,
                          mode=SoftmaxMode.ROUTER)
            self._command(m, r, self.dispatcher_cmd, 1, rows=a.rows, experts=a.experts,
                          top_k=a.top_k)
            with m.If(r.sent[0] & r.sent[1]):
                m.next = "ROUTE_WAIT"
        with m.State("ROUTE_WAIT"):
            m.d.comb += self.busy.eq(1)
            with m.If(~dispatcher.busy & ~self.softmax_busy):
                m.d.sync += r.routed.eq(1)
                m.next = "NEXT"

        # EXPERTS: run the body once per iteration (NEXT loops back at the body's end).
        with m.State("EXPERTS"):
            a = args.experts
            m.d.comb += self.busy.eq(1)
            m.d.sync += [
                r.loop_tbt.eq(Mux(a.order == ExpertOrder.REGISTER,
                                  r.run_schedule == Schedule.TOKEN_BY_TOKEN,
                                  a.order == ExpertOrder.TOKEN_BY_TOKEN)),
                r.loop_stride.eq(a.stride), r.loop_first.eq(r.pc + 1),
                r.loop_last.eq(r.pc + a.body),
                r.loop_index.eq(0), r.loop_token.eq(0), r.loop_choice.eq(0),
            ]
            with m.If(~r.routed | (dispatcher.n_active == 0)):
                m.d.sync += r.pc.eq(r.pc + a.body)     # NEXT steps past the body
                m.next = "NEXT"
            with m.Else():
                m.d.sync += [r.loop_active.eq(1), r.sent.eq(0)]
                m.d.comb += self.retired.eq(1)
                m.next = "LOOP_CTX"
        with m.State("LOOP_CTX"):
            m.d.comb += [self.busy.eq(1), dispatcher.list_index.eq(r.loop_index),
                         walks.slot_lookup.eq(1), walks.slot_token.eq(r.loop_token)]
            m.next = "LOOP_CTX2"
        with m.State("LOOP_CTX2"):
            m.d.comb += self.busy.eq(1)
            slot = dispatcher.slot[r.loop_choice]
            with m.If(r.loop_tbt):
                m.d.sync += [r.ctx_expert.eq(slot.expert), r.ctx_offset.eq(slot.pos),
                             r.ctx_count.eq(1)]
            with m.Else():
                m.d.sync += [r.ctx_expert.eq(dispatcher.list_expert),
                             r.ctx_offset.eq(dispatcher.list_start),
                             r.ctx_count.eq(dispatcher.list_count)]
            m.next = "LOOP_CTX3"
        with m.State("LOOP_CTX3"):
            m.d.comb += self.busy.eq(1)
            m.d.sync += [r.expert_offset.eq(r.ctx_expert * r.loop_stride), r.pc.eq(r.loop_first)]
            m.next = "FETCH"

        # COMBINE: each token's top-k expert outputs through the slot table.
        with m.State("COMBINE_START"):
            a = args.combine
            m.d.comb += self.busy.eq(1)
            m.d.sync += [r.unit.eq(Unit.COMBINE), r.gather_mode.eq(GatherMode.SLOT)]
            self._expect_writes(m, a.rows * a.beats)
            self._walk(m, walks.walk_a, a.src, (a.beats, a.src_stride), (a.rows, 0),
                       (dispatcher.top_k, 0))
            self._walk(m, walks.walk_w, a.dst, (a.beats, a.dst_stride), (a.rows, 1))
            with m.If(a.residual):
                # x, read where the output is written, from res_src.
                self._walk(m, walks.walk_b, a.res_src, (a.beats, a.dst_stride), (a.rows, 1))
                m.d.sync += [r.residual_fused.eq(1), r.res_cmd_valid.eq(1),
                             r.res_cmd.beats.eq(a.rows * a.beats),
                             r.res_cmd.mult_a.eq(a.res_mult_out),
                             r.res_cmd.mult_b.eq(a.res_mult_buf),
                             r.res_cmd.shift.eq(a.res_shift)]
            m.next = "COMBINE_RUN"
        with m.State("COMBINE_RUN"):
            a = args.combine
            m.d.comb += self.busy.eq(1)
            self._command(m, r, self.combiner_cmd, 0, words=a.rows * a.beats,
                          top_k=dispatcher.top_k, mult=a.mult, shift=a.shift)
            with m.If(r.sent[0] & self.datapath.writes_done):
                m.next = "NEXT"

    def _end_states(self, m: Module, r: _Registers) -> None:
        """NEXT (and the EXPERTS loop's step), STOP_DONE, STOP_ERROR."""
        dispatcher = self.dispatcher
        with m.State("NEXT"):
            m.d.comb += [self.busy.eq(1), self.retired.eq(1)]
            m.d.sync += [r.pc.eq(r.pc + 1), r.sink.eq(ReadSink.NONE), r.sent.eq(0)]
            with m.If(~r.pending):   # a pending GEMM still owns the unit and port A
                m.d.sync += [r.unit.eq(Unit.NONE), r.weights_from_buffer.eq(0),
                             r.gather_mode.eq(GatherMode.NONE), r.residual_fused.eq(0)]
            m.next = "FETCH"
            with m.If(r.loop_active & (r.pc == r.loop_last)):
                last_choice = r.loop_choice == dispatcher.top_k - 1
                finished = Mux(r.loop_tbt,
                               (r.loop_token == dispatcher.rows - 1) & last_choice,
                               r.loop_index == dispatcher.n_active - 1)
                with m.If(finished):
                    m.d.sync += r.loop_active.eq(0)
                with m.Elif(r.loop_tbt & last_choice):
                    m.d.sync += [r.loop_choice.eq(0), r.loop_token.eq(r.loop_token + 1)]
                    m.next = "LOOP_CTX"
                with m.Elif(r.loop_tbt):
                    m.d.sync += r.loop_choice.eq(r.loop_choice + 1)
                    m.next = "LOOP_CTX"
                with m.Else():
                    m.d.sync += r.loop_index.eq(r.loop_index + 1)
                    m.next = "LOOP_CTX"
        with m.State("STOP_DONE"):
            m.d.comb += self.busy.eq(1)
            with m.If(self.dma_error):
                # An error on the fetch of END's own line: through STOP_ERROR, so that the
                # code is in the stop-code register when `error` latches it (raising
                # `error` here latched the old code, NONE — found by the bus-fault bench).
                self._stop(m, r, ErrorCode.AXI_RESPONSE)
            with m.Else():
                m.d.comb += self.done.eq(1)
                m.next = "IDLE"
        with m.State("STOP_ERROR"):
            m.d.comb += [self.busy.eq(1), self.error.eq(1)]
            m.next = "IDLE"


#: The state each opcode starts in, after its checks.
_FIRST_STATE = {
    Opcode.END: "STOP_DONE",
    Opcode.NOP: "NEXT",
    Opcode.TASKS: "TASKS",
    Opcode.GEMM: "GEMM_START",
    Opcode.LAYERNORM: "LN_PARAMS",
    Opcode.SOFTMAX: "SOFTMAX_START",
    Opcode.RESIDUAL: "RESIDUAL_START",
    Opcode.LOAD: "LOAD_START",
    Opcode.STORE: "STORE_START",
    Opcode.LOAD_TABLE: "TABLE_START",
    Opcode.ROUTE: "ROUTE_START",
    Opcode.EXPERTS: "EXPERTS",
    Opcode.COMBINE: "COMBINE_START",
}
