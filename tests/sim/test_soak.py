"""A short soak (issue #18; `make bench` runs a long one): random task switches, both
schedules, random DDR timing, aborts — every image bit-exact, no hang, counters steady."""

import pytest

from m3vit.sw.bench.soak import soak


@pytest.mark.slow
@pytest.mark.xdist_group("soc_ci")
def test_a_short_soak_is_exact_throughout():
    stats = soak(14, seed=3, abort_every=5)
    assert stats.hangs == 0 and stats.mismatched_images == [] and stats.counter_mismatches == []
    assert stats.exact_images == stats.images > 0
    assert stats.aborts >= 2 and stats.task_switches >= 2
    assert len(stats.by_schedule) == 2
