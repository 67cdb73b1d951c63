"""Reading Verilator coverage files (m3vit.sim.coverage), on a small file written here."""

import pytest

from m3vit.sim.coverage import read_coverage


def point(t, line, hier, what, count):
    fields = {"f": "m3vit_accel.v", "l": str(line), "t": t, "page": f"v_{t}/x", "o": what,
              "h": hier}
    body = "".join(f"\x01{k}\x02{v}" for k, v in fields.items())
    return f"C '{body}' {count}\n"


def test_points_are_summed_across_files_and_shared_out_by_block(tmp_path):
    top = "m3vit_accel.m3vit_accel"
    a = tmp_path / "a.dat"
    a.write_text("# SystemC::Coverage-3\n"
                 + point("line", 10, f"{top}.engine.controller", "block", 3)
                 + point("line", 11, f"{top}.engine.controller", "if", 0)
                 + point("line", 20, f"{top}.dma.read_dma", "block", 0)
                 + point("toggle", 5, top, "engine___05Fpc[0]:0->1", 1))
    b = tmp_path / "b.dat"
    b.write_text("# SystemC::Coverage-3\n"
                 + point("line", 11, f"{top}.engine.controller", "if", 2))
    cov = read_coverage(a)
    assert cov.share("line") == (1, 3) and cov.share("toggle") == (1, 1)
    cov.add(read_coverage(b))
    assert cov.share("line") == (2, 3)
    assert cov.by_block("line") == {"dma.read_dma": (0, 1), "engine.controller": (2, 2)}
    assert cov.by_block("toggle") == {"engine": (1, 1)}
    assert cov.missed("line") == [("dma.read_dma", "20", "block")]


def test_another_file_is_refused(tmp_path):
    bad = tmp_path / "x.dat"
    bad.write_text("hello\n")
    with pytest.raises(ValueError, match="not a Verilator coverage file"):
        read_coverage(bad)
