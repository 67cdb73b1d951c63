"""The instruction set: one declaration, exact encoding, generated documentation."""

import random

import pytest

from m3vit.hw import isa
from m3vit.hw.config import CI, ZCU104, AccelConfigError
from m3vit.hw.isa import INSTRUCTION, OPERANDS, IsaError, Opcode, decode, encode


def test_instruction_word_is_256_bits_and_every_operand_fits():
    assert INSTRUCTION.size == isa.INSTRUCTION_BITS == 256
    for op, layout in OPERANDS.items():
        assert 8 + layout.size <= 256, op


@pytest.mark.parametrize("op", list(Opcode))
def test_encode_decode_round_trip_on_random_fields(op):
    rng = random.Random(20251128 + op.value)
    for _ in range(50):
        fields = {}
        for name, field in OPERANDS[op]:
            fields[name] = rng.randrange(1 << field.width)
        # Enum-typed fields only take their members' values.
        for name, field in OPERANDS[op]:
            shape = field.shape
            if isinstance(shape, type) and hasattr(shape, "__members__"):
                fields[name] = rng.choice(list(shape)).value
        word = encode(op, **fields)
        assert len(word) == isa.INSTRUCTION_BYTES
        assert word[0] == op.value
        assert decode(word) == (op, fields)


def test_fields_land_where_the_layout_says():
    word = int.from_bytes(encode(Opcode.LOAD, ddr=0xDEADBEEF, words=3), "little")
    ddr = dict(OPERANDS[Opcode.LOAD])["ddr"]
    assert (word >> (8 + ddr.offset)) & 0xFFFFFFFF == 0xDEADBEEF
    assert word & 0xFF == Opcode.LOAD.value


def test_bad_fields_are_refused_with_the_field_named():
    with pytest.raises(IsaError, match=r"GEMM.tokens = 32768 does not fit in 15"):
        encode(Opcode.GEMM, tokens=1 << 15)
    with pytest.raises(IsaError, match="has no field 'bogus'"):
        encode(Opcode.NOP, bogus=1)
    with pytest.raises(IsaError, match="is not a WeightSource"):
        encode(Opcode.GEMM, wsrc=3)
    with pytest.raises(IsaError, match="illegal opcode 0xff"):
        decode(b"\xff" + bytes(31))
    with pytest.raises(IsaError, match="32 bytes"):
        decode(bytes(31))


def test_docs_isa_md_is_generated_from_the_declaration():
    assert isa.main(["--check"]) == 0, "run `python -m m3vit.hw.isa` to regenerate docs/isa.md"


def test_isa_docs_help_prints_usage_and_writes_nothing(capsys, monkeypatch):
    # --help (as any argument) once regenerated docs/isa.md; now it only explains.
    monkeypatch.setattr(isa.Path, "write_text", lambda *a, **k: pytest.fail("wrote a file"))
    with pytest.raises(SystemExit) as stop:
        isa.main(["--help"])
    assert stop.value.code == 0 and "--check" in capsys.readouterr().out


def test_top_config_constraints():
    assert isa.check_top_config(CI) is CI
    assert isa.check_top_config(ZCU104) is ZCU104
    with pytest.raises(AccelConfigError, match="pe_rows == pe_cols"):
        isa.check_top_config(CI.replace(pe_rows=8))
    with pytest.raises(AccelConfigError, match="pe_rows >= 4"):
        isa.check_top_config(CI.replace(pe_rows=2, pe_cols=2))
    with pytest.raises(AccelConfigError, match="at least one AXI beat"):
        isa.check_top_config(CI.replace(pe_rows=4, pe_cols=4, gemm_words=1,
                                        axi_data_width=256))
