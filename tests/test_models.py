"""Model parts: tiny shapes, real-size parameter counts and shapes on the meta device, image splicing, rotary
embeddings, and per-stage freezing (grads and optimizer state)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, TINY
from torch import nn

from vlpretrain.config import load_config, trainable_parts
from vlpretrain.models.llm import apply_rotary, rotary_cos_sin
from vlpretrain.models.vlm import PARTS, build_model, count_parameters, part_of, set_trainable
from vlpretrain.train.optim import build_optimizer


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(TINY / "stage2.yaml")
    model = build_model(cfg.model, "cpu", seed=0).eval()
    return cfg, model


@pytest.fixture(scope="module")
def real():
    """Both real-size models on the meta device: shapes and counts only, no memory."""
    out = {}
    for name in ("deepseek-vl-7b", "deepseek-vl-1.3b"):
        cfg = load_config(CONFIGS / name / "stage2.yaml")
        out[name] = (cfg, build_model(cfg.model, "meta"))
    return out


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


# ---------------------------------------------------------------------------------------------------------------
# tiny shapes


def test_tiny_tower_and_adaptor_shapes(tiny):
    cfg, model = tiny
    m = cfg.model
    n = 3
    x = _images(n, m.image_size, 0)
    assert m.image_size == m.sam.image_size == 128
    grid = m.siglip.image_size // m.siglip.patch_size
    assert m.image_tokens == grid * grid == 36
    with torch.no_grad():
        low = model.embed.vision.siglip(x)
        high = model.embed.vision.sam(x)
        both = model.embed.vision(x)
        out = model.embed.adaptor(high, low)
    assert low.shape == (n, m.image_tokens, m.siglip.width) == (n, 36, 96)
    assert high.shape == (n, m.image_tokens, m.sam.downsample_channels[-1]) == (n, 36, 96)
    assert torch.equal(both[0], high) and torch.equal(both[1], low)
    assert out.shape == (n, m.image_tokens, m.dim) == (n, 36, 128)
    # SAM grid arithmetic: 128/8 = 16 -> interp 24 -> 12 -> 6
    g = m.sam.interp_size
    for _ in m.sam.downsample_channels:
        g = (g - 1) // 2 + 1
    assert g * g == m.image_tokens


def test_sam_hd_path_gate(tiny):
    """The neck_hd side path starts as a no-op (gate 0) and contributes once the gate is non-zero."""
    cfg, model = tiny
    sam = model.embed.vision.sam
    assert cfg.model.sam.hd_path and sam.hd_alpha_downsamples.item() == 0.0
    x = _images(2, cfg.model.image_size, 11)
    with torch.no_grad():
        base = sam(x)
        # the same tower without the side path gives the same output at gate 0
        vit = sam.vit
        h = vit.patch_embed((x - torch.tensor(cfg.model.sam.mean).view(1, 3, 1, 1))
                            / torch.tensor(cfg.model.sam.std).view(1, 3, 1, 1)) + vit.pos_embed
        for blk in vit.blocks:
            h = blk(h)
        size = (cfg.model.sam.interp_size,) * 2
        h = F.interpolate(vit.neck(h.permute(0, 3, 1, 2)), size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(sam.downsamples(h).flatten(2).transpose(1, 2), base, atol=1e-5, rtol=1e-5)
        try:
            sam.hd_alpha_downsamples.fill_(0.5)
            gated = sam(x)
        finally:
            sam.hd_alpha_downsamples.zero_()
    assert gated.shape == base.shape
    assert (gated - base).abs().max() > 1e-3


def test_tiny_full_model_logits(tiny):
    cfg, model = tiny
    m = cfg.model
    b, s = 2, 64
    tokens = torch.randint(10, m.vocab_size, (b, s), generator=torch.Generator().manual_seed(1))
    tokens[0, 5:5 + m.image_tokens] = m.image_token_id
    images = torch.zeros(b, 1, 3, m.image_size, m.image_size)
    images[0, 0] = _images(1, m.image_size, 2)[0]
    with torch.no_grad():
        logits = model(tokens, images)
        text_only = model(tokens[1:], None)
    assert logits.shape == (b, s, m.vocab_size) == (2, 64, 2048)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # the text-only sample gives the same logits alone and next to an image sample
    torch.testing.assert_close(logits[1:], text_only, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# real sizes on the meta device


def _vit_params(width: int, depth: int, mlp_ratio: float, patch: int, tokens: int) -> int:
    hidden = int(width * mlp_ratio)
    block = 4 * width + (width * 3 * width + 3 * width) + (width * width + width) \
        + (width * hidden + hidden) + (hidden * width + width)
    return (3 * patch * patch * width + width) + tokens * width + depth * block + 2 * width


def test_real_siglip_parameter_count(real):
    for name, (cfg, model) in real.items():
        s = cfg.model.siglip
        n = _numel(model.embed.vision.siglip)
        assert 303e6 <= n <= 305e6, (name, n)
        # ViT-L/16 @384 without class token or head: patch embed + pos embed + 24 blocks + final norm
        assert n == _vit_params(s.width, s.depth, s.mlp_ratio, s.patch_size, cfg.model.image_tokens) == 303_688_704
        assert count_parameters(model)["siglip"] == n


def test_real_sam_vit_b_parameter_count(real):
    cfg, model = real["deepseek-vl-7b"]
    sam = model.embed.vision.sam
    n_vit = _numel(sam.vit)
    assert 89e6 <= n_vit <= 91e6, n_vit
    # the rest of the tower: the hd neck copy, its gate and the two stride-2 convs
    a = cfg.model.sam
    convs = 3 * 3 * (a.neck_chans * a.downsample_channels[0] + a.downsample_channels[0] * a.downsample_channels[1])
    assert _numel(sam.downsamples) == convs == 9 * (256 * 512 + 512 * 1024)
    assert _numel(sam.neck_hd) == _numel(sam.vit.neck)
    assert count_parameters(model)["sam"] == n_vit + _numel(sam.neck_hd) + convs + 1
    assert real["deepseek-vl-1.3b"][1].embed.vision.sam is None
    assert count_parameters(real["deepseek-vl-1.3b"][1])["sam"] == 0


def test_real_llm_parameter_counts(real):
    for name, lo, hi in (("deepseek-vl-7b", 6.90e9, 6.92e9), ("deepseek-vl-1.3b", 1.62e9, 1.65e9)):
        cfg, model = real[name]
        m = cfg.model
        n = count_parameters(model)["llm"]
        assert lo <= n <= hi, (name, n)
        layer = 4 * m.dim * m.dim + 3 * m.dim * m.ffn_dim + 2 * m.dim
        assert n == 2 * m.vocab_size * m.dim + m.n_layers * layer + m.dim
    assert count_parameters(real["deepseek-vl-7b"][1])["llm"] == 6_910_365_696


def test_real_adaptors(real):
    cfg13, m13 = real["deepseek-vl-1.3b"]
    ada = m13.embed.adaptor
    assert not ada.hybrid
    layers = list(ada.layers)
    assert [type(x) for x in layers] == [nn.Linear, nn.GELU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features) == (1024, 2048)
    assert (layers[2].in_features, layers[2].out_features) == (2048, 2048)
    assert _numel(ada) == 1024 * 2048 + 2048 + 2048 * 2048 + 2048 == 6_295_552

    cfg7, m7 = real["deepseek-vl-7b"]
    ada = m7.embed.adaptor
    assert ada.hybrid
    n, sam_dim, sig_dim = cfg7.model.dim, cfg7.model.sam.downsample_channels[-1], cfg7.model.siglip.width
    expected = (sam_dim * n // 2 + n // 2) + (sig_dim * n // 2 + n // 2) + (n * n + n)
    assert (n, sam_dim, sig_dim) == (4096, 1024, 1024)
    assert _numel(ada) == expected == 20_979_712
    assert count_parameters(m7)["adaptor"] == expected


def test_real_tower_shapes_on_meta(real):
    cfg7, m7 = real["deepseek-vl-7b"]
    x = torch.empty(1, 3, cfg7.model.image_size, cfg7.model.image_size, device="meta")
    assert x.shape[-1] == 1024
    with torch.no_grad():
        low = m7.embed.vision.siglip(x)
        high = m7.embed.vision.sam(x)
        out = m7.embed.adaptor(high, low)
    assert low.shape == (1, 576, 1024) and low.is_meta
    assert high.shape == (1, 576, 1024) and high.is_meta
    assert out.shape == (1, 576, 4096)
    cfg13, m13 = real["deepseek-vl-1.3b"]
    x = torch.empty(1, 3, cfg13.model.image_size, cfg13.model.image_size, device="meta")
    with torch.no_grad():
        low = m13.embed.vision.siglip(x)
        assert m13.embed.vision(x)[0] is None
        assert m13.embed.adaptor(None, low).shape == (1, 576, 2048)
    assert low.shape == (1, 576, 1024)


# ---------------------------------------------------------------------------------------------------------------
# splicing image features into the token sequence


def _feats(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.embed.adaptor(*model.embed.vision(pixels))


def test_splice_positions_get_adaptor_outputs_in_order(tiny):
    cfg, model = tiny
    m = cfg.model
    t, s = m.image_tokens, 3 * m.image_tokens + 20
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(10, m.vocab_size, (3, s), generator=g)
    # sample 0: two images (runs at 4.. and 4+t+5..); sample 1: text only; sample 2: one image at the end
    a0, b0, c0 = 4, 4 + t + 5, s - t
    tokens[0, a0:a0 + t] = m.image_token_id
    tokens[0, b0:b0 + t] = m.image_token_id
    tokens[2, c0:] = m.image_token_id
    pix = _images(3, m.image_size, 4)  # A, B, C
    images = torch.zeros(3, 2, 3, m.image_size, m.image_size)
    images[0, 0], images[0, 1], images[2, 0] = pix[0], pix[1], pix[2]
    images[1, 0] = pix[2]  # garbage in a slot of a text-only sample must be ignored
    images[2, 1] = pix[0]  # and past a sample's own count too

    captured = []
    hook = model.embed.adaptor.register_forward_hook(lambda mod, inp, out: captured.append(out.detach()))
    try:
        with torch.no_grad():
            h = model.embed(tokens, images)
    finally:
        hook.remove()
    assert h.shape == (3, s, m.dim)
    (spliced,) = captured
    assert spliced.shape == (3, t, m.dim)  # exactly three images went through the towers
    # image positions hold exactly the adaptor outputs, in placeholder order
    assert torch.equal(h[0, a0:a0 + t], spliced[0])
    assert torch.equal(h[0, b0:b0 + t], spliced[1])
    assert torch.equal(h[2, c0:], spliced[2])
    # ... which are the features of A, B, C (computed image by image)
    for k, (row, start) in enumerate([(0, a0), (0, b0), (2, c0)]):
        torch.testing.assert_close(h[row, start:start + t], _feats(model, pix[k:k + 1])[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(spliced[0], spliced[1], atol=1e-3)  # A and B differ, so order is really checked
    # text positions hold the token embeddings
    is_img = tokens == m.image_token_id
    emb = model.embed.tok_embeddings.weight
    assert torch.equal(h[~is_img], emb[tokens[~is_img]])
    assert torch.equal(h[1], emb[tokens[1]])


def test_splice_text_only_batch_and_errors(tiny):
    cfg, model = tiny
    m = cfg.model
    tokens = torch.randint(10, m.vocab_size, (2, 50), generator=torch.Generator().manual_seed(5))
    emb = model.embed.tok_embeddings.weight
    with torch.no_grad():
        assert torch.equal(model.embed(tokens, None), emb[tokens])
        assert torch.equal(model.embed(tokens, torch.zeros(2, 0, 3, 128, 128)), emb[tokens])
        # a batch with image slots but no placeholders: nothing goes through the towers
        assert torch.equal(model.embed(tokens, torch.zeros(2, 1, 3, 128, 128)), emb[tokens])
    bad = tokens.clone()
    bad[0, 3:3 + m.image_tokens - 1] = m.image_token_id  # one short of a full image
    images = _images(2, m.image_size, 6).view(2, 1, 3, m.image_size, m.image_size)
    with pytest.raises(ValueError, match="multiple"):
        model.embed(bad, images)
    bad2 = tokens.clone()
    bad2[1, 3:3 + m.image_tokens + 1] = m.image_token_id  # one over
    with pytest.raises(ValueError):
        model.embed(bad2, images)
    good = tokens.clone()
    good[0, 3:3 + m.image_tokens] = m.image_token_id
    with pytest.raises(ValueError):
        model.embed(good, None)  # placeholders without images


# ---------------------------------------------------------------------------------------------------------------
# rotary embeddings


def test_apply_rotary_matches_complex_rotation():
    b, h, s, d, theta = 2, 3, 40, 16, 10000.0
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, h, s, d, generator=g, dtype=torch.float64).float()
    positions = torch.stack([torch.arange(s), torch.arange(s) * 3 + 11])  # (B, S), different per sample
    cos, sin = rotary_cos_sin(positions, d, theta)
    assert cos.shape == sin.shape == (b, s, d)
    out = apply_rotary(x, cos, sin)
    # half-rotation layout (HF Llama): pair (j, j + d/2) is the complex number x_j + i x_{j+d/2}, rotated by pos*f_j
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.double()[:, None, :, None] * freqs  # (B, 1, S, d/2)
    z = torch.complex(x[..., :d // 2].double(), x[..., d // 2:].double()) * torch.polar(torch.ones_like(angle), angle)
    ref = torch.cat([z.real, z.imag], dim=-1).float()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # a rotation keeps norms
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-5)
    # position 0 is the identity
    assert torch.equal(out[0, :, 0], x[0, :, 0])


def test_rotary_scores_depend_only_on_relative_position():
    d, s = 32, 24
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 2, s, d, generator=g)
    k = torch.randn(1, 2, s, d, generator=g)

    def scores(offset: int) -> torch.Tensor:
        pos = (torch.arange(s) + offset)[None]
        cos, sin = rotary_cos_sin(pos, d, 10000.0)
        return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2)

    base = scores(0)
    for off in (1, 7, 100):
        torch.testing.assert_close(scores(off), base, atol=2e-4, rtol=1e-4)
    # and they do depend on the relative position
    raw = q @ k.transpose(-1, -2)
    assert not torch.allclose(base, raw, atol=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# freezing per stage


EXPECTED_TRAINABLE = {1: {"adaptor"}, 2: {"adaptor", "llm"}, 3: {"adaptor", "llm", "siglip"}}


def test_part_of_names():
    assert part_of("embed.vision.siglip.vit.blocks.0.attn.qkv.weight") == "siglip"
    assert part_of("embed.vision.sam.vit.neck.0.weight") == "sam"
    assert part_of("embed.vision.sam.hd_alpha_downsamples") == "sam"
    assert part_of("embed.adaptor.layers.1.weight") == "adaptor"
    assert part_of("embed.tok_embeddings.weight") == "llm"
    assert part_of("layers.3.attention.wq.weight") == "llm"
    assert part_of("head.output.weight") == "llm"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_freezing_grads_and_optimizer(stage):
    cfg = load_config(TINY / f"stage{stage}.yaml")
    parts = trainable_parts(cfg)
    assert set(parts) == EXPECTED_TRAINABLE[stage]
    m = cfg.model
    model = build_model(m, "cpu", seed=0)
    set_trainable(model, parts)
    for name, p in model.named_parameters():
        assert p.requires_grad == (part_of(name) in EXPECTED_TRAINABLE[stage]), name
    counts = count_parameters(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == sum(counts[x] for x in EXPECTED_TRAINABLE[stage])
    assert all(counts[x] > 0 for x in PARTS)

    # one forward/backward with an image in every sample
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(10, m.vocab_size, (2, 60), generator=g)
    tokens[:, 2:2 + m.image_tokens] = m.image_token_id
    images = _images(2, m.image_size, 10).view(2, 1, 3, m.image_size, m.image_size)
    labels = torch.roll(tokens, -1, dims=1)
    logits = model(tokens, images)
    F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    for name, p in model.embed.adaptor.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if "llm" in parts:
        assert model.head.output.weight.grad is not None and model.layers["0"].attention.wq.weight.grad is not None
    if "siglip" in parts:
        assert model.embed.vision.siglip.vit.blocks[0].attn.qkv.weight.grad is not None

    opt, sched = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.train)
    held = [p for group in opt.param_groups for p in group["params"]]
    assert len(held) == len({id(p) for p in held})
    assert {id(p) for p in held} == {id(p) for p in model.parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt.step()
    trainable_ids = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(opt.state) > 0
    assert all(id(p) in trainable_ids for p in opt.state)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p not in opt.state, n
            assert torch.equal(p, frozen_before[n]), n


def test_set_trainable_rejects_unknown_part(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="vision"):
        set_trainable(model, ["vision"])
