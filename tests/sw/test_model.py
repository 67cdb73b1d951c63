"""The float M³ViT: routing semantics, balance loss, task isolation, presets."""

import math

import pytest
import torch

from m3vit.sw.errors import M3VitError
from m3vit.sw.model.config import PRESETS, ConfigError, ModelConfig, get_preset
from m3vit.sw.model.m3vit import M3ViT, MoELayer, cv_squared, load_balancing_loss, route

# Float routing results are compared with 1e-6 absolute tolerance: softmax of log(p) gives
# p back only up to float32 rounding (~6e-8 relative); chosen indices are compared exactly.
FLOAT_TOL = 1e-6


def test_route_hand_example():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.1, 0.3, 0.2]]))
    r = route(logits, top_k=2)
    assert r.experts.tolist() == [[3, 2], [0, 2]]
    torch.testing.assert_close(r.scores, torch.tensor([[0.4, 0.3], [0.4, 0.3]]),
                               atol=FLOAT_TOL, rtol=0)
    # Not renormalised: the two scores of a token sum to 0.7, not 1.
    torch.testing.assert_close(r.scores.sum(1), torch.tensor([0.7, 0.7]), atol=FLOAT_TOL, rtol=0)


def test_route_ties_go_to_lower_index():
    logits = torch.tensor([
        [0.0, 0.0, 0.0, 0.0],        # all equal -> 0, 1
        [1.0, 2.0, 1.0, 2.0],        # pairwise ties -> 1, 3
        [5.0, 1.0, 5.0, 5.0],        # three-way tie for first -> 0, 2
    ])
    r = route(logits, top_k=2)
    assert r.experts.tolist() == [[0, 1], [1, 3], [0, 2]]
    assert torch.allclose(r.scores[0], torch.tensor([0.25, 0.25]))


def test_route_softmax_over_all_experts_before_topk():
    # Softmax over all four experts: the top-1 score is e^2 / (e^2 + 3), not 1.
    r = route(torch.tensor([[2.0, 0.0, 0.0, 0.0]]), top_k=1)
    expected = math.exp(2) / (math.exp(2) + 3)
    assert r.experts.tolist() == [[0]]
    assert abs(r.scores.item() - expected) < FLOAT_TOL


def test_cv_squared_and_balance_loss_hand_example():
    assert cv_squared(torch.tensor([2.0, 2.0, 2.0])).item() == 0.0
    # var([1, 3]) (unbiased) = 2, mean = 2 -> cv² = 0.5
    assert abs(cv_squared(torch.tensor([1.0, 3.0])).item() - 0.5) < 1e-8
    # 3 tokens, E = 2, k = 1: probabilities chosen by hand.
    logits = torch.log(torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]))
    r = route(logits, top_k=1)
    assert r.experts.flatten().tolist() == [0, 0, 1]
    importance = torch.tensor([0.8 + 0.6, 0.7])       # summed chosen scores
    load = torch.tensor([2.0, 1.0])                   # tokens per expert
    want = importance.var() / importance.mean() ** 2 + load.var() / load.mean() ** 2
    assert abs(load_balancing_loss(r, 2).item() - want.item()) < 1e-5


def test_balance_loss_zero_when_perfectly_balanced():
    # Two tokens, each sends equal score to a different expert.
    r = route(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), top_k=1)
    assert load_balancing_loss(r, 2).item() < 1e-10


def _naive_moe(layer: MoELayer, x: torch.Tensor, task: str) -> torch.Tensor:
    """Token-by-token reference: out[t] = Σ_j score_j · expert_j(x[t])."""
    flat = x.reshape(-1, x.shape[-1])
    r = route(layer.router_logits(flat, task), layer.top_k)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(layer.top_k):
            e = int(r.experts[t, j])
            out[t] += r.scores[t, j] * layer.experts[e](flat[t : t + 1])[0]
    return out.reshape(x.shape)


@pytest.mark.parametrize("gate", ["multi", "task_cond"])
def test_moe_expert_by_expert_equals_token_by_token(gate):
    cfg = get_preset("tiny", gate=gate)
    layer = M3ViT(cfg, seed=3).blocks[1].moe
    x = torch.randn(2, 17, cfg.embed_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast, _ = layer(x, "depth")
        slow = _naive_moe(layer, x, "depth")
    # Same products summed in another order: float32 reassociation error only.
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)


def test_moe_layers_sit_on_odd_blocks():
    model = M3ViT(get_preset("edge-moe"))
    assert [i for i, b in enumerate(model.blocks) if b.is_moe] == [1, 3, 5, 7, 9, 11]
    dense = M3ViT(get_preset("tiny", n_experts=0))
    assert not any(b.is_moe for b in dense.blocks)


def _images(cfg: ModelConfig, n: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.in_chans, *cfg.img_size, generator=gen)


@pytest.mark.parametrize("gate", ["multi", "task_cond"])
def test_single_task_forward_ignores_other_tasks(gate):
    cfg = get_preset("tiny", gate=gate)
    model = M3ViT(cfg, seed=1).eval()
    x = _images(cfg)
    with torch.no_grad():
        before = model(x, task="semseg")
        for block in model.blocks:
            if block.is_moe:
                if gate == "multi":
                    block.moe.routers["depth"].weight.normal_()
                else:
                    block.moe.task_embed[1].normal_(std=10.0)
        model.heads["depth"].proj.weight.normal_()
        after = model(x, task="semseg")
        assert torch.equal(before, after)
        # ...while perturbing the task's own router does change it (the test can fail).
        if gate == "multi":
            model.blocks[1].moe.routers["semseg"].weight.normal_(std=10.0)
        else:
            model.blocks[1].moe.task_embed[0].normal_(std=10.0)
        assert not torch.equal(before, model(x, task="semseg"))


def test_all_task_forward_is_each_single_task_forward():
    cfg = get_preset("tiny")
    model = M3ViT(cfg, seed=2).eval()
    x = _images(cfg)
    with torch.no_grad():
        outs = model(x)
        assert set(outs) == {"semseg", "depth"}
        for name, y in outs.items():
            assert torch.equal(y, model(x, task=name))
    assert outs["semseg"].shape == (2, 4, 32, 32)
    assert outs["depth"].shape == (2, 1, 32, 32)


def test_setr_pup_head_shape():
    cfg = get_preset("tiny", head="setr_pup")
    y = M3ViT(cfg).eval()(_images(cfg), task="semseg")
    assert y.shape == (2, 4, 32, 32)


def test_model_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = M3ViT(get_preset("tiny"), seed=7).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = M3ViT(get_preset("tiny"), seed=7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"top_k": 5}, "top_k must be between 1 and n_experts=4, got 5"),
        ({"img_size": (30, 32)}, "not divisible by the patch size 4"),
        ({"gate": "noisy"}, "gate must be one of"),
    ],
)
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("tiny", **overrides)


def test_unknown_preset_and_task():
    with pytest.raises(M3VitError, match=r"unknown preset 'huge'.*tiny, edge-moe, m3vit-s"):
        get_preset("huge")
    model = M3ViT(get_preset("tiny"))
    with pytest.raises(M3VitError, match=r"unknown task 'normals'.*semseg, depth"):
        model(_images(model.cfg), task="normals")


def test_wrong_input_shape_is_refused():
    model = M3ViT(get_preset("tiny"))
    with pytest.raises(M3VitError, match=r"expected \(batch, 3, 32, 32\)"):
        model(torch.zeros(1, 3, 64, 64), task="depth")


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_round_trip(name):
    cfg = PRESETS[name]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_edge_moe_preset_matches_edge_moe_paper():
    cfg = PRESETS["edge-moe"]
    assert cfg.n_tokens == 129
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden) == (192, 12, 3, 768)
    assert (cfg.n_experts, cfg.top_k, cfg.expert_hidden) == (16, 2, 384)
    assert cfg.task_names == ("semseg", "depth")
