"""AccelConfig validation and identity."""

import pytest

from m3vit.hw.config import CI, ZCU104, AccelConfig, AccelConfigError


def test_defaults():
    # 32 x 64: 2,048 INT8 products a cycle; the buffer and result words stay 32 lanes.
    assert ZCU104.n_pe == 2048 and ZCU104.axi_bytes == 16
    assert ZCU104.gemm_cols == 64 and ZCU104.pe_cols == 32
    assert CI.n_pe == 32 and CI.gemm_cols == 8
    assert AccelConfig().gemm_words == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pe_rows": 24}, "pe_rows must be a power of two in \\[2, 128\\], got 24"),
        ({"max_dim": 100}, "max_dim must be a multiple of the PE array"),
        ({"axi_data_width": 96}, "axi_data_width"),
        ({"max_burst_beats": 256, "axi_data_width": 256}, "must not exceed 4 KiB"),
        ({"max_top_k": 100}, "max_top_k must be <= max_experts=64"),
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"gemm_words": 3}, "gemm_words must be 1, 2 or 4, got 3"),
        ({"pe_cols": 128}, "N width gemm_words · pe_cols must be at most 128"),
        ({"max_dim": 160}, "max_dim must be a multiple of the PE array \\(32x64\\)"),
    ],
)
def test_bad_configs_are_refused(changes, message):
    with pytest.raises(AccelConfigError, match=message):
        ZCU104.replace(**changes)


def test_config_hash_identifies_the_configuration():
    assert ZCU104.config_hash() == AccelConfig(gemm_words=2, act_buffer_words=24576).config_hash()
    assert ZCU104.config_hash() != AccelConfig().config_hash()
    assert ZCU104.config_hash() != ZCU104.replace(max_tokens=512).config_hash()
    assert 0 <= ZCU104.config_hash() < 2**32
