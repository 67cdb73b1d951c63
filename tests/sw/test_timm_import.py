"""Initialising M³ViT from a timm VisionTransformer."""

import pytest
import torch

from m3vit.sw.errors import M3VitError
from m3vit.sw.model.config import get_preset
from m3vit.sw.model.m3vit import M3ViT
from m3vit.sw.model.timm_import import create_timm_vit, load_timm_weights

# Same float32 arithmetic in another order (explicit attention matmuls here, timm's fused
# scaled_dot_product_attention there) over 12 blocks: errors of a few 1e-6 are expected.
TOL = 1e-5


def test_dense_backbone_matches_timm():
    cfg = get_preset("edge-moe", n_experts=0)        # MoE disabled: a plain ViT-Tiny
    vit = create_timm_vit("vit_tiny_patch16_224", cfg, seed=0)
    model = M3ViT(cfg).eval()
    load_timm_weights(model, vit)
    x = torch.randn(2, 3, 128, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model.forward_features(x, "semseg")
        theirs = vit.forward_features(x)
    diff = (ours - theirs).abs().max().item()
    print(f"max |ours - timm| = {diff:.2e}")
    assert diff <= TOL


def test_experts_are_slices_of_the_dense_mlp():
    cfg = get_preset("edge-moe")
    vit = create_timm_vit("vit_tiny_patch16_224", cfg, seed=0)
    model = M3ViT(cfg)
    load_timm_weights(model, vit)
    mlp = vit.blocks[1].mlp
    experts = model.blocks[1].moe.experts
    assert torch.equal(experts[0].fc1.weight, mlp.fc1.weight[:384])
    assert torch.equal(experts[1].fc1.weight, mlp.fc1.weight[384:])
    assert torch.equal(experts[2].fc2.weight, mlp.fc2.weight[:, :384])
    assert torch.equal(experts[3].fc2.bias, mlp.fc2.bias)
    # Dense blocks are copied as they are.
    assert torch.equal(model.blocks[0].mlp.fc1.weight, vit.blocks[0].mlp.fc1.weight)


def test_position_embedding_is_resampled_for_another_size():
    # A ViT built at 224x224 (14x14 grid) loaded into edge-moe (128x256, 8x16 grid).
    cfg = get_preset("edge-moe")
    vit = create_timm_vit("vit_tiny_patch16_224", cfg.replace(img_size=(224, 224)), seed=0)
    model = M3ViT(cfg)
    load_timm_weights(model, vit)
    assert model.pos_embed.shape == (1, 129, 192)
    assert torch.equal(model.pos_embed[:, 0], vit.pos_embed[:, 0])      # cls kept as is
    assert not torch.equal(model.pos_embed[:, 1:17], vit.pos_embed[:, 1:17])


def test_mismatched_vit_is_refused():
    vit = create_timm_vit("vit_tiny_patch16_224", get_preset("edge-moe"), seed=0)
    with pytest.raises(M3VitError, match="does not match preset 'tiny': embed_dim 192 != 64"):
        load_timm_weights(M3ViT(get_preset("tiny")), vit)


def test_unknown_timm_model():
    with pytest.raises(M3VitError, match="timm has no model 'vit_nonexistent'"):
        create_timm_vit("vit_nonexistent", get_preset("edge-moe"))
