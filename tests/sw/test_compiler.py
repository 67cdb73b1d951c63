"""The compiler's layouts and programs, checked with the instruction-level model."""

import pytest
import torch

from m3vit.hw.config import CI, ZCU104
from m3vit.hw.isa import Opcode
from m3vit.sw import golden
from m3vit.sw.compiler import (
    BufferPlan,
    DdrImage,
    Program,
    compile_dense_block,
    slice_major,
    unslice,
)
from m3vit.sw.config import get_preset
from m3vit.sw.data import make_scenes
from m3vit.sw.errors import M3VitError
from m3vit.sw.isa_model import execute
from m3vit.sw.model import M3ViT
from m3vit.sw.quantize import quantize


@pytest.fixture(scope="module", params=["tiny", "edge-moe"])
def block_case(request):
    cfg = get_preset(request.param)
    pkg = quantize(M3ViT(cfg, seed=0), n_calib=4)
    image = make_scenes(1, cfg.img_size, n_classes=4, seed=5)["image"]
    x_q = golden.quantize_image(image, pkg.params["scales"]["input"])
    _, cap = golden.forward(pkg.tensors, cfg, x_q, cfg.task_names[0], capture=True)
    return cfg, pkg.tensors, cap


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
    from m3vit.sw.compiler import embedding_program, head_output, head_program

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
    from m3vit.sw.compiler import slice_major
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
    got = head_output(bytes(ddr[out:]), cfg.n_patches, head.shape[-1], accel.pe_cols)
    assert torch.equal(got, head.to(torch.int64))
