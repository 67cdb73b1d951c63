"""The compiler's layouts and programs, checked with the instruction-level model."""

import functools
import itertools

import numpy as np
import pytest
import torch

from m3vit.hw.config import CI, ZCU104
from m3vit.hw.isa import (
    ExpertOrder,
    GemmMode,
    Opcode,
    RowMode,
    TableUnit,
    WeightSource,
    decode,
)
from m3vit.hw.registers import Schedule
from m3vit.sw.bench.programs import moe_batch_case
from m3vit.sw.compiler.isa_model import dispatch_tables, execute, visit_order
from m3vit.sw.compiler.layout import slice_major, unslice
from m3vit.sw.compiler.lower import (
    BatchTooLarge,
    BufferPlan,
    DdrImage,
    Program,
    TaskBlocks,
    activation_words,
    check_model_fits,
    compile_block,
    compile_dense_block,
    compile_model,
    gemm_stream,
    largest_batch,
    largest_input,
    shared_blocks,
)
from m3vit.sw.errors import M3VitError
from m3vit.sw.model.config import get_preset
from m3vit.sw.model.data import make_scenes
from m3vit.sw.model.m3vit import M3ViT
from m3vit.sw.quant import golden
from m3vit.sw.quant.quantize import quantize

MOE_BLOCK = 1


def accel_for(preset: str):
    """The accelerator each preset is tested on."""
    return CI if preset == "tiny" else ZCU104.replace(max_tokens=129)


@functools.cache
def quantized(preset: str):
    """A randomly initialised ``preset``, quantized, and one quantized image (seed 5)."""
    cfg = get_preset(preset)
    pkg = quantize(M3ViT(cfg, seed=0), n_calib=4)
    image = make_scenes(1, cfg.img_size, n_classes=4, seed=5)["image"]
    return cfg, pkg, golden.quantize_image(image, pkg.params["scales"]["input"])


@pytest.fixture(scope="module", params=["tiny", "edge-moe"])
def block_case(request):
    cfg, pkg, x_q = quantized(request.param)
    _, cap = golden.forward(pkg.tensors, cfg, x_q, cfg.task_names[0], capture=True)
    return cfg, pkg.tensors, cap


@pytest.fixture(scope="module", params=["tiny", "edge-moe"])
def moe_case(request):
    """(cfg, tensors, {task: golden captures}) of a preset, every task."""
    cfg, pkg, x_q = quantized(request.param)
    caps = {task: golden.forward(pkg.tensors, cfg, x_q, task, capture=True)[1]
            for task in cfg.task_names}
    return cfg, pkg.tensors, caps


def run_block(t, cfg, accel, cap, task, schedule=Schedule.EXPERT_BY_EXPERT,
              order=ExpertOrder.REGISTER):
    """Compile MoE block 1 on the golden input, run it; (machine, output, image)."""
    program, image, _, out = compile_block(t, cfg, accel, MOE_BLOCK,
                                           cap[f"blocks.{MOE_BLOCK - 1}.x2"][0], order=order)
    ddr = bytearray(image.data)
    mc = execute(accel, program, ddr, task_select=cfg.task_names.index(task),
                 schedule=schedule)
    words = cfg.n_tokens * cfg.embed_dim
    got = unslice(bytes(ddr[out:out + words]), cfg.n_tokens, cfg.embed_dim, accel.pe_cols)
    return mc, got, image


def test_slice_major_round_trip():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-128, 128, (65, 64), generator=g)
    raw = slice_major(x, 4)
    assert len(raw) == 65 * 64
    # word s·M + m holds channels 4s..4s+3 of token m
    assert list(raw[(3 * 65 + 7) * 4:(3 * 65 + 7) * 4 + 4]) == [v & 0xFF for v in x[7, 12:16]]
    assert torch.equal(unslice(raw, 65, 64, 4), x.to(torch.int8))


def test_dense_block_program_equals_the_golden_block(block_case):
    cfg, t, cap = block_case
    accel = CI if cfg.name == "tiny" else ZCU104.replace(max_tokens=129)
    program, image, _, out = compile_dense_block(t, cfg, accel, 0, cap["x0"][0])
    ddr = bytearray(image.data)
    execute(accel, program, ddr)
    x2 = cap["blocks.0.x2"][0]
    got = unslice(bytes(ddr[out:out + x2.numel()]), cfg.n_tokens, cfg.embed_dim, accel.pe_cols)
    assert torch.equal(got, x2.to(torch.int8))


@pytest.mark.parametrize("accel", [ZCU104.replace(max_tokens=129),
                                   CI.replace(gemm_words=1)], ids=["zcu104", "ci-one-word"])
def test_tiny_block_on_other_arrays_equals_the_golden_block(accel):
    """``tiny`` (heads 32 channels wide) on the ZCU104's 64-wide N-tiles, where each head's
    P·V also writes the next head's words (that head overwrites them; the last one's spill
    has room), and on a CI array whose results are one word a row."""
    cfg, pkg, x_q = quantized("tiny")
    _, cap = golden.forward(pkg.tensors, cfg, x_q, cfg.task_names[0], capture=True)
    assert cfg.head_dim < ZCU104.gemm_cols
    program, image, _, out = compile_dense_block(pkg.tensors, cfg, accel, 0, cap["x0"][0])
    ddr = bytearray(image.data)
    execute(accel, program, ddr)
    x2 = cap["blocks.0.x2"][0]
    got = unslice(bytes(ddr[out:out + x2.numel()]), cfg.n_tokens, cfg.embed_dim, accel.pe_cols)
    assert torch.equal(got, x2.to(torch.int8))


def test_moe_block_is_refused_by_the_dense_compiler(block_case):
    cfg, t, cap = block_case
    with pytest.raises(M3VitError, match="MoE block"):
        compile_dense_block(t, cfg, CI if cfg.name == "tiny" else ZCU104, 1, cap["x0"][0])


def test_activations_that_do_not_fit_are_refused():
    plan = BufferPlan(CI.replace(act_buffer_words=256))
    with pytest.raises(M3VitError, match="need 260 buffer words, the hardware has 256"):
        plan.alloc("x", 65, 16)


def test_bad_task_select_stops_the_model():
    prog = Program()
    prog.add(Opcode.TASKS, count=2, stride=64)
    prog.add(Opcode.END)
    execute(CI, prog.encode(), bytearray(64), task_select=1)
    with pytest.raises(M3VitError, match="task 2"):
        execute(CI, prog.encode(), bytearray(64), task_select=2)


def test_image_regions_are_aligned():
    img = DdrImage(align=16)
    assert img.put("a", b"123") == 0
    assert img.put("b", b"4") == 16
    assert len(img.data) == 32


def test_embedding_and_head_programs_equal_the_golden(block_case):
    from m3vit.sw.compiler.layout import head_output
    from m3vit.sw.compiler.lower import embedding_program, head_program

    cfg, t, cap = block_case
    accel = CI if cfg.name == "tiny" else ZCU104.replace(max_tokens=129)
    task = cfg.task_names[0]
    img, plan, prog = DdrImage(align=accel.axi_bytes), BufferPlan(accel), Program()
    patches = golden.patchify(cap["input"], cfg.patch_size)[0]
    x0 = embedding_program(prog, img, plan, t, cfg, accel, patches)
    words = cfg.embed_dim // accel.pe_cols * cfg.n_tokens
    x0_out = img.reserve("x0_out", words * accel.pe_cols)
    prog.add(Opcode.STORE, ddr=x0_out, src=x0, src_stride=1, words=words)
    # The head on the golden model's last block output.
    last = plan.alloc("last", cfg.n_tokens, cfg.embed_dim)
    from m3vit.sw.compiler.layout import slice_major
    prog.add(Opcode.LOAD, ddr=img.put("last", slice_major(cap[f"blocks.{cfg.depth - 1}.x2"][0],
                                                        accel.pe_cols)),
             dst=last, dst_stride=1, words=words)
    norm = plan.alloc("norm", cfg.n_tokens, cfg.embed_dim)
    out = head_program(prog, img, t, cfg, accel, task, last, norm)
    prog.add(Opcode.END)
    ddr = bytearray(img.data)
    execute(accel, prog.encode(), ddr)
    got_x0 = unslice(bytes(ddr[x0_out:x0_out + words * accel.pe_cols]), cfg.n_tokens,
                     cfg.embed_dim, accel.pe_cols)
    assert torch.equal(got_x0, cap["x0"][0].to(torch.int8))
    head = cap[f"heads.{task}"][0]
    got = head_output(bytes(ddr[out:]), cfg.n_patches, head.shape[-1], accel.gemm_cols)
    assert torch.equal(got, head.to(torch.int64))


# ---- the MoE layer ------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", list(Schedule))
def test_moe_block_equals_the_golden_block(moe_case, schedule):
    cfg, t, caps = moe_case
    accel = accel_for(cfg.name)
    for task, cap in caps.items():
        mc, got, _ = run_block(t, cfg, accel, cap, task, schedule)
        want = cap[f"blocks.{MOE_BLOCK}.x2"][0].to(torch.int8)
        assert torch.equal(got, want), f"{cfg.name} {task} {schedule.name}: " \
            f"{(got != want).sum().item()} outputs differ"
        order = (ExpertOrder.EXPERT_BY_EXPERT if schedule == Schedule.EXPERT_BY_EXPERT
                 else ExpertOrder.TOKEN_BY_TOKEN)
        assert [loop.order for loop in mc.loops] == [order]


def test_moe_block_order_can_be_forced_over_the_register():
    cfg, pkg, x_q = quantized("tiny")
    task = cfg.task_names[1]
    _, cap = golden.forward(pkg.tensors, cfg, x_q, task, capture=True)
    for order, schedule in ((ExpertOrder.EXPERT_BY_EXPERT, Schedule.TOKEN_BY_TOKEN),
                            (ExpertOrder.TOKEN_BY_TOKEN, Schedule.EXPERT_BY_EXPERT)):
        mc, got, _ = run_block(pkg.tensors, cfg, CI, cap, task, schedule, order)
        assert [loop.order for loop in mc.loops] == [order]
        assert torch.equal(got, cap[f"blocks.{MOE_BLOCK}.x2"][0].to(torch.int8))


def _expert_blocks(image, cfg):
    p = f"blocks.{MOE_BLOCK}.experts"
    return [image.regions[f"{p}.{e}"] for e in range(cfg.n_experts)]


def test_expert_weights_are_read_once_per_layer_expert_by_expert():
    cfg, pkg, x_q = quantized("tiny")
    for task in cfg.task_names:
        _, cap = golden.forward(pkg.tensors, cfg, x_q, task, capture=True)
        counts = torch.bincount(cap[f"blocks.{MOE_BLOCK}.experts"].reshape(-1),
                                minlength=cfg.n_experts)
        m, k = cfg.n_tokens, cfg.top_k
        ebe, _, image = run_block(pkg.tensors, cfg, CI, cap, task, Schedule.EXPERT_BY_EXPERT)
        tbt, _, _ = run_block(pkg.tensors, cfg, CI, cap, task, Schedule.TOKEN_BY_TOKEN)
        blocks = _expert_blocks(image, cfg)
        # Consecutive blocks at the constant EXPERTS stride, FC1 + FC2 filling each.
        stride = blocks[1][0] - blocks[0][0]
        assert all(off == blocks[0][0] + e * stride for e, (off, _) in enumerate(blocks))
        for e, (offset, size) in enumerate(blocks):
            once = ebe.read_counts(offset, size)
            assert (once == int(counts[e] > 0)).all(), f"{task}: expert {e}"
            assert (tbt.read_counts(offset, size) == int(counts[e])).all(), f"{task}: expert {e}"
        expert_bytes = sum(size for _, size in blocks)
        tbt_expert_reads = sum(tbt.read_counts(o, s).sum() for o, s in blocks)
        assert tbt_expert_reads == m * k * blocks[0][1]   # M·k reads of a whole block
        assert sum(ebe.read_counts(o, s).sum() for o, s in blocks) <= expert_bytes
        loop = ebe.loops[0]
        order = visit_order(counts.tolist())
        assert sorted(order) == torch.nonzero(counts).reshape(-1).tolist()
        assert [it.expert for it in loop.iterations] == order
        assert [it.count for it in loop.iterations] == [int(counts[e]) for e in order]
        assert len(tbt.loops[0].iterations) == m * k
        # Only the selected task's router and exp table are read.
        for other in cfg.task_names:
            reads = ebe.read_counts(*image.regions[f"tasks.{other}"])
            assert (reads.sum() > 0) == (other == task), f"task {task} read {other}'s block"


def _degenerate_router(t, cfg, task, logits):
    """A copy of the tensors whose router for ``task`` gives every token ``logits``."""
    t = dict(t)
    r = f"blocks.{MOE_BLOCK}.router.{task}"
    t[f"{r}.weight"] = torch.zeros_like(t[f"{r}.weight"])
    t[f"{r}.bias"] = torch.tensor(logits, dtype=t[f"{r}.bias"].dtype)
    t[f"{r}.mult"] = torch.ones_like(t[f"{r}.mult"])
    t[f"{r}.shift"] = torch.zeros_like(t[f"{r}.shift"])
    return t


@pytest.mark.parametrize("logits, chosen", [([0, 0, 0, 0], [0, 1]),        # ties: lower index
                                            ([0, 0, 126, 127], [3, 2])])   # descending score
@pytest.mark.parametrize("schedule", list(Schedule))
def test_every_token_choosing_the_same_experts(logits, chosen, schedule):
    cfg, pkg, x_q = quantized("tiny")
    task = cfg.task_names[0]
    t = _degenerate_router(pkg.tensors, cfg, task, logits)
    _, cap = golden.forward(t, cfg, x_q, task, capture=True)
    experts = cap[f"blocks.{MOE_BLOCK}.experts"]
    assert (experts == torch.tensor(chosen)).all(), "the router is not degenerate"
    mc, got, image = run_block(t, cfg, CI, cap, task, schedule)
    assert torch.equal(got, cap[f"blocks.{MOE_BLOCK}.x2"][0].to(torch.int8))
    m = cfg.n_tokens
    blocks = _expert_blocks(image, cfg)
    for e, (offset, size) in enumerate(blocks):
        reads = mc.read_counts(offset, size)
        want = 0 if e not in chosen else (1 if schedule == Schedule.EXPERT_BY_EXPERT else m)
        assert (reads == want).all(), f"expert {e}"
    if schedule == Schedule.EXPERT_BY_EXPERT:
        first, second = sorted(chosen)
        assert [(it.expert, it.offset, it.count) for it in mc.loops[0].iterations] == \
            [(first, 0, m), (second, m, m)]


def test_dispatch_tables_by_hand():
    # 3 tokens, 4 experts, top-2: token 0 → (2, 0), token 1 → (0, 3), token 2 → (2, 1).
    # The logits rank (token 2: logit 7 > 5 although both scores are 9); the scores ride.
    logits = torch.tensor([[20, 1, 30, 5], [30, 1, 2, 10], [0, 5, 7, 0]])
    scores = torch.tensor([[20, 1, 30, 5], [30, 1, 2, 10], [0, 7, 9, 0]])
    d = dispatch_tables(logits, scores, 2)
    assert d.experts.tolist() == [[2, 0], [0, 3], [2, 1]]
    assert d.scores.tolist() == [[30, 20], [30, 10], [9, 7]]
    assert d.count.tolist() == [2, 1, 2, 1]
    assert d.start.tolist() == [0, 2, 3, 5]
    assert d.queue.tolist() == [0, 1, 2, 0, 2, 1]
    # Visits: by count (2, 2, 1, 1; ties to the lower expert) from both ends in turn.
    assert d.active.tolist() == [0, 3, 2, 1]
    assert d.pos.tolist() == [[3, 0], [1, 5], [4, 2]]
    ebe = d.iterations(ExpertOrder.EXPERT_BY_EXPERT)
    assert [(i.expert, i.offset, i.count) for i in ebe] == [(0, 0, 2), (3, 5, 1), (2, 3, 2),
                                                            (1, 2, 1)]
    tbt = d.iterations(ExpertOrder.TOKEN_BY_TOKEN)
    assert [(i.expert, i.offset, i.count) for i in tbt] == [(2, 3, 1), (0, 0, 1), (0, 1, 1),
                                                            (3, 5, 1), (2, 4, 1), (1, 2, 1)]


def test_visit_order_alternates_the_largest_and_the_smallest_left():
    assert visit_order([0, 0]) == []
    assert visit_order([5]) == [0]
    assert visit_order([1, 9, 0, 4, 4, 2, 7]) == [1, 0, 6, 5, 3, 4]
    # Equal counts keep the lower expert first wherever they are taken from.
    assert visit_order([3, 3, 3, 3, 3]) == [0, 4, 1, 3, 2]


# ---- EXPERTS loops (the bad programs are one list for the hardware and the model:
# ---- tests/sw/test_bad_programs.py) ------------------------------------------------


_EXPERT_GEMM = dict(mode=GemmMode.INT8, wsrc=WeightSource.DDR, expert=1, tokens=1, k_slices=1,
                    n_tiles=1, src_stride=3, dst=64, dst_stride=6)
_LOOP = (Opcode.EXPERTS, dict(order=ExpertOrder.EXPERT_BY_EXPERT, body=1, stride=64))


def test_experts_without_a_route_skip_their_body():
    prog = Program()
    prog.add(*_LOOP[:1], **_LOOP[1])
    prog.add(Opcode.GEMM, **_EXPERT_GEMM)
    prog.add(Opcode.END)
    mc = execute(CI, prog.encode(), bytearray(4096))
    assert [loop.iterations for loop in mc.loops] == [()]
    assert mc.accesses == []


def test_queue_rows_of_an_expert_gemm_in_both_orders():
    """GATHER reads the queued tokens, QUEUE writes the iteration's queue rows: a body GEMM
    with an identity weight copies token queue[q] to row q under either order."""
    C = CI.pe_cols
    img, prog = DdrImage(align=CI.axi_bytes), Program()
    rng = np.random.default_rng(7)
    x = rng.integers(-100, 100, size=(3, C)).astype(np.int8)
    prog.add(Opcode.LOAD, ddr=img.put("x", x.tobytes()), dst=0, dst_stride=1, words=3)
    # Logits: token 0 → experts (2, 0), token 1 → (0, 3), token 2 → (2, 1).
    logits = np.array([[20, 1, 30, 5], [10, 1, 2, 8], [0, 7, 9, 0]], "<i2")
    # INT16 logits, C/2 a word: word 8 + (e ÷ (C/2))·3 + m.
    H = C // 2
    words = logits.reshape(3, 4 // H, H).transpose(1, 0, 2)
    prog.add(Opcode.LOAD, ddr=img.put("logits", words.tobytes()), dst=8, dst_stride=1,
             words=3 * (4 // H))
    table = (32768 >> np.minimum(np.arange(256), 15)).astype("<u2")  # exp(-u·ln 2)
    prog.add(Opcode.LOAD_TABLE, unit=TableUnit.SOFTMAX, ddr=img.put("exp", table.tobytes()))
    prog.add(Opcode.ROUTE, src=8, stride=3, rows=3, experts=4, top_k=2)
    identity = np.eye(C, dtype=np.int8)
    stream = b"".join(gemm_stream(identity, np.zeros(C), np.ones(C), np.zeros(C), CI)
                      for _ in range(4))
    ddr = img.put("experts", stream)
    out = img.reserve("y", 6 * C)
    prog.add(Opcode.EXPERTS, order=ExpertOrder.REGISTER, body=1, stride=len(stream) // 4)
    prog.add(Opcode.GEMM, mode=GemmMode.INT8, wsrc=WeightSource.DDR, expert=1,
             src_rows=RowMode.GATHER, dst_rows=RowMode.QUEUE, tokens=3, k_slices=1,
             n_tiles=1, src=0, src_stride=3, dst=16, dst_stride=6, ddr=ddr)
    prog.add(Opcode.STORE, ddr=out, src=16, src_stride=1, words=6)
    prog.add(Opcode.END)
    queue = [0, 1, 2, 0, 2, 1]   # expert 0: tokens 0, 1; 1: 2; 2: 0, 2; 3: 1
    for schedule in Schedule:
        window = bytearray(img.data)
        mc = execute(CI, prog.encode(), window, schedule=schedule)
        got = np.frombuffer(bytes(window[out:out + 6 * C]), np.int8).reshape(6, C)
        assert (got == x[queue]).all(), schedule.name
        assert mc.dispatch.experts.tolist() == [[2, 0], [0, 3], [2, 1]]
        assert mc.dispatch.queue.tolist() == queue


# ---- the whole model -----------------------------------------------------------------------


def test_one_program_and_image_run_every_task_and_image():
    cfg, pkg, _ = quantized("tiny")
    compiled = compile_model(pkg.tensors, cfg, CI)
    images = make_scenes(2, cfg.img_size, n_classes=4, seed=11)["image"]
    x_q = golden.quantize_image(images, pkg.params["scales"]["input"])
    patches = golden.patchify(x_q, cfg.patch_size)
    assert compiled.plan.peak <= CI.act_buffer_words
    for b in range(len(images)):
        for task in cfg.task_names:
            want, _ = golden.forward(pkg.tensors, cfg, x_q[b:b + 1], task)
            for schedule in Schedule:
                ddr = bytearray(compiled.image.data)
                compiled.write_input(ddr, patches[b])
                mc = execute(CI, compiled.program, ddr, task_select=compiled.task_select(task),
                             schedule=schedule)
                got = compiled.head(ddr, task)
                assert torch.equal(got, want[0]), f"image {b}, {task}, {schedule.name}"
                assert len(mc.loops) == len(cfg.moe_blocks)
                # Nothing but the input region differs between images and tasks.
                head = slice(compiled.output_offset, compiled.output_offset
                             + compiled.output_size)
                inp = slice(compiled.input_offset, compiled.input_offset + compiled.input_size)
                rest = bytearray(ddr)
                rest[head] = compiled.image.data[head]
                rest[inp] = compiled.image.data[inp]
                assert rest == compiled.image.data


def test_the_input_region_starts_with_the_given_patches():
    cfg, pkg, x_q = quantized("tiny")
    patches = golden.patchify(x_q, cfg.patch_size)[0]
    compiled = compile_model(pkg.tensors, cfg, CI, patches)
    offset, size = compiled.image.regions["patches"]
    assert bytes(compiled.image.data[offset:offset + size]) == compiled.input_bytes(patches)
    with pytest.raises(M3VitError, match="patches must be 64x48"):
        compiled.input_bytes(patches[1:])


def test_per_task_blocks_hold_each_item_at_one_offset():
    cfg, pkg, _ = quantized("tiny")
    compiled = compile_model(pkg.tensors, cfg, CI)
    tb, img = compiled.tasks, compiled.image
    names = [f"blocks.{i}.router{s}" for i in cfg.moe_blocks for s in ("", ".exp")] + ["heads"]
    assert list(tb.items) == names
    first = img.regions[f"tasks.{cfg.task_names[0]}"][0]
    for i, task in enumerate(cfg.task_names):
        assert img.regions[f"tasks.{task}"] == (first + i * tb.stride, tb.stride)
        for name in names:
            offset, size = tb.items[name]
            raw = bytes(img.data[first + i * tb.stride + offset:][:size])
            if name.endswith(".exp"):
                table = pkg.tensors[f"{name[:-len('.exp')]}.{task}.exp"].numpy()
                assert raw == table.astype("<u2").tobytes()
            elif name.endswith(".router"):
                r = f"{name}.{task}"
                assert raw == gemm_stream(*(pkg.tensors[f"{r}.{f}"] for f in
                                            ("weight", "bias", "mult", "shift")), CI)
    # The program selects them: TASKS(count, stride) first.
    op, fields = decode(compiled.program[:32])
    assert (op, fields["count"], fields["stride"]) == (Opcode.TASKS, len(cfg.task_names),
                                                       tb.stride)


def test_task_blocks_pad_items_to_one_size():
    tb = TaskBlocks(("a", "b"), align=16)
    assert tb.add("x", {"a": b"1", "b": b"123"}) == 0
    assert tb.add("y", {"a": b"4" * 17, "b": b"5"}) == 16
    assert tb.stride == 48
    img = DdrImage(align=16)
    img.put("before", b"z")
    assert tb.place(img) == 16
    assert tb.ddr("y") == 32
    assert bytes(img.data[16 + 48:16 + 48 + 16]) == b"123" + bytes(13)
    with pytest.raises(M3VitError, match="after the blocks were placed"):
        tb.add("z", {"a": b"", "b": b""})
    with pytest.raises(M3VitError, match="no per-task item 'w'"):
        tb.ddr("w")


@pytest.mark.parametrize("change, message", [
    (dict(max_experts=2), "4 experts exceed max_experts=2"),
    (dict(max_top_k=1), "top_k 2 exceeds max_top_k=1"),
    (dict(max_tokens=64), "65 tokens exceed max_tokens=64"),
    (dict(max_dim=32), "embed_dim 64 exceeds max_dim=32"),
    (dict(max_hidden=128), "mlp_hidden 256 exceeds max_hidden=128"),
    (dict(max_heads=1), "2 heads exceed max_heads=1"),
    (dict(act_buffer_words=8192), r"activations need \d+ buffer words, the hardware has "
                                  r"8192 \(act_buffer_words"),
])
def test_a_model_that_does_not_fit_is_refused(change, message):
    cfg, pkg, _ = quantized("tiny")
    accel = CI.replace(**change)
    with pytest.raises(M3VitError, match=message):
        compile_model(pkg.tensors, cfg, accel)
    if "act_buffer_words" not in change:
        with pytest.raises(M3VitError, match=message):
            compile_block(pkg.tensors, cfg, accel, MOE_BLOCK, torch.zeros(65, 64))


def test_presets_that_do_not_fit_the_zcu104_are_named():
    check_model_fits(get_preset("edge-moe"), ZCU104)
    with pytest.raises(M3VitError, match=r"'m3vit-s' .* 1201 tokens exceed max_tokens=1024 "
                       r"and one 480x640 image's activations need 299049 buffer words, the "
                       r"hardware has 24576 .* not spilled to DDR: train it at --img-size "
                       r"192x256 or smaller"):
        check_model_fits(get_preset("m3vit-s"), ZCU104)


def test_the_input_suggested_for_a_model_too_large_fits_and_one_row_more_does_not():
    """m3vit-s within max_tokens but past the buffer: the line names the words it needs
    (the unbounded plan's peak), and the largest input it suggests is exactly the edge."""
    model = get_preset("m3vit-s", img_size=(256, 384))
    need = activation_words(model, ZCU104)
    assert need > ZCU104.act_buffer_words
    with pytest.raises(M3VitError, match=rf"one 256x384 image's activations need {need} buffer "
                                         r"words.* --img-size 176x256 or smaller"):
        check_model_fits(model, ZCU104)
    assert largest_input(model, ZCU104) == (176, 256)
    check_model_fits(model.replace(img_size=(176, 256)), ZCU104)
    with pytest.raises(M3VitError, match="--img-size 176x256"):
        check_model_fits(model.replace(img_size=(192, 272)), ZCU104)
    assert largest_input(get_preset("tiny"), CI) == (32, 32)
    with pytest.raises(M3VitError, match="'setr_pup' head is float-only"):
        check_model_fits(get_preset("tiny", head="setr_pup"), CI)


# ---- batches -------------------------------------------------------------------------------


@functools.cache
def tiny16():
    """``tiny`` on a 16 × 16 input: 17 tokens an image, so four fit the CI max_tokens."""
    cfg = get_preset("tiny", img_size=(16, 16))
    pkg = quantize(M3ViT(cfg, seed=0), n_calib=4)
    images = make_scenes(4, cfg.img_size, n_classes=4, seed=11)["image"]
    return cfg, pkg, golden.quantize_image(images, pkg.params["scales"]["input"])


def run_batch(compiled, accel, patches, task, schedule=Schedule.EXPERT_BY_EXPERT):
    ddr = bytearray(compiled.image.data)
    for slot, rows in enumerate(patches):
        compiled.write_input(ddr, rows, slot)
    execute(accel, compiled.programs[len(patches) - 1], ddr,
            task_select=compiled.task_select(task), schedule=schedule)
    return [compiled.head(ddr, task, slot) for slot in range(len(patches))]


@pytest.mark.parametrize("words", [16384, 4096])
def test_every_batch_gives_each_image_its_own_golden_head(words, monkeypatch):
    """Programs for batches of 1…B share one image; each image of a batch gets exactly the
    head golden gives it alone, every task and schedule. With 4,096 buffer words and the
    heads' outputs in a room of their own (not LN1's), QKV does not fit for the batch and
    runs image by image (the compiler's fallback layout)."""
    if words == 4096:
        from m3vit.sw.compiler import lower

        attention = lower.attention_program
        monkeypatch.setattr(lower, "attention_program",
                            lambda *a, **k: attention(*a, **{**k, "src_scratch": False}))
    cfg, pkg, x_q = tiny16()
    accel = CI.replace(act_buffer_words=words)
    compiled = compile_model(pkg.tensors, cfg, accel, max_batch=largest_batch(cfg, accel))
    assert compiled.max_batch == (4 if words == 16384 else 2)
    assert compiled.plan.peak <= words
    patches = golden.patchify(x_q, cfg.patch_size)
    qkv = [f for op, f in (decode(compiled.programs[-1][i:i + 32])
                           for i in range(0, len(compiled.programs[-1]), 32))
           if op == Opcode.GEMM and f["n_tiles"] == 3 * cfg.embed_dim // accel.gemm_cols]
    # One QKV GEMM a block for the whole batch, or one an image.
    assert {f["tokens"] for f in qkv} == ({4 * cfg.n_tokens} if words == 16384
                                          else {cfg.n_tokens})
    for task in cfg.task_names:
        want = [golden.forward(pkg.tensors, cfg, x_q[b:b + 1], task)[0][0]
                for b in range(len(x_q))]
        for batch in range(1, compiled.max_batch + 1):
            for schedule in Schedule:
                got = run_batch(compiled, accel, patches[:batch], task, schedule)
                for b in range(batch):
                    assert torch.equal(got[b], want[b]), (task, batch, b, schedule.name)


def test_a_batch_reads_each_weight_once():
    """A batch's program has one dense GEMM per layer for all its images (attention per
    image), and the same EXPERTS loops as one image's."""
    cfg, pkg, _ = tiny16()
    compiled = compile_model(pkg.tensors, cfg, CI, max_batch=4)
    ops = [[decode(p[i:i + 32]) for i in range(0, len(p), 32)] for p in compiled.programs]
    experts = [sum(op == Opcode.EXPERTS for op, _ in prog) for prog in ops]
    assert experts == [len(cfg.moe_blocks)] * 4
    ddr_gemms = [sum(op == Opcode.GEMM and f["wsrc"] == WeightSource.DDR.value and not f["expert"]
                     for op, f in prog) for prog in ops]
    # Per image: the patch GEMM and the head; per batch: everything else.
    assert [b - a for a, b in itertools.pairwise(ddr_gemms)] == [2, 2, 2]
    attention = [sum(op == Opcode.SOFTMAX for op, _ in prog) for prog in ops]
    assert attention == [cfg.depth * cfg.num_heads * b for b in range(1, 5)]


def test_a_batch_that_does_not_fit_is_refused_with_the_largest_that_does():
    cfg, pkg, _ = tiny16()
    with pytest.raises(BatchTooLarge, match=r"a batch of 5 is 85 tokens, over max_tokens=80: "
                                            r"'tiny' on this accelerator runs batches of at "
                                            r"most 4; use --max-batch 4"):
        compile_model(pkg.tensors, cfg, CI, max_batch=5)
    small = CI.replace(act_buffer_words=4096)
    with pytest.raises(BatchTooLarge, match=r"a batch of 3: activations need \d+ buffer words, "
                                            r"the hardware has 4096 .* at most 2"):
        compile_model(pkg.tensors, cfg, small, max_batch=3)
    with pytest.raises(M3VitError, match="max_batch must be a whole number >= 1"):
        compile_model(pkg.tensors, cfg, CI, max_batch=0)


def test_largest_batches_of_the_presets():
    assert largest_batch(get_preset("edge-moe"), ZCU104) == 4
    assert largest_batch(get_preset("edge-moe"), ZCU104.replace(act_buffer_words=16384)) == 3
    assert largest_batch(get_preset("tiny"), CI) == 1
    assert largest_batch(get_preset("tiny", img_size=(16, 16)), CI) == 4


@pytest.mark.parametrize("routing, batch", [("disjoint", 2), ("same-two", 2),
                                            ("same-two", 4)])
def test_moe_over_a_batch_matches_each_image_alone(routing, batch):
    """One ROUTE over a batch's tokens and one expert loop: each image's MoE output equals
    the golden MoE layer of that image alone, whether the images choose disjoint experts
    or all the same two (the routing is checked too)."""
    for schedule in Schedule:
        case = moe_batch_case(CI, routing, batch, schedule=schedule.value)
        ddr = bytearray(case.ddr)
        execute(CI, case.program, ddr, task_select=case.task_select, schedule=schedule)
        case.check(bytes(ddr))
    assert case.meta["chosen"] == ([[0, 1], [2, 3]] if routing == "disjoint"
                                   else [[0, 1]] * batch)


def test_shared_and_task_programs_give_every_task_its_head():
    """``--task all``: the shared program (embedding and the blocks before the first MoE
    block: nothing per task) once, then each task's program from its stored x; every head
    equals golden's, for one image and a batch."""
    cfg, pkg, x_q = tiny16()
    compiled = compile_model(pkg.tensors, cfg, CI, max_batch=3)
    assert shared_blocks(cfg) == min(cfg.moe_blocks) == 1
    for prog in compiled.shared_programs:
        fields = [decode(prog[i:i + 32]) for i in range(0, len(prog), 32)]
        assert not any(f.get("per_task") for _, f in fields)
        assert sum(op == Opcode.STORE for op, _ in fields) == 1
    patches = golden.patchify(x_q, cfg.patch_size)
    for batch in (1, 3):
        ddr = bytearray(compiled.image.data)
        for slot in range(batch):
            compiled.write_input(ddr, patches[slot], slot)
        execute(CI, compiled.shared_programs[batch - 1], ddr)
        for task in cfg.task_names:
            execute(CI, compiled.task_programs[batch - 1], ddr,
                    task_select=compiled.task_select(task))
            for b in range(batch):
                want = golden.forward(pkg.tensors, cfg, x_q[b:b + 1], task)[0][0]
                assert torch.equal(compiled.head(ddr, task, b), want), (batch, task, b)
