"""model.impl=te without transformer-engine (one line), the config rules for te / fp8, and TEDecoderBlock against
llm.DecoderBlock with a FAKE ``transformer_engine.pytorch`` (torch stand-ins with TE's documented signatures, no
``**kwargs``, so a misspelt argument fails here): identical parameter names, shapes and state-dict keys, the same
outputs and gradients on unpacked and packed rows, and the FP8 context selection."""
from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from torch import nn

from vlpretrain.config import ConfigError, ModelConfig, load_config
from vlpretrain.errors import UserError
from vlpretrain.models import te as te_mod
from vlpretrain.models.attention import document_mask
from vlpretrain.models.llm import DecoderBlock, KVCache, rotary_cos_sin

# ---------------------------------------------------------------------------------------------------------------
# the fake transformer_engine: torch math behind TE's public signatures (transformer_engine 2.x docs)


class _TEModule(nn.Module):
    """TE modules keep FP8 metadata as extra state (``<prefix>._extra_state`` in state_dict)."""

    def get_extra_state(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        self.extra_state_loaded = state


def _cuda_default(device):
    # TE builds on CUDA unless told otherwise; this machine has none, so a forgotten device= fails here
    return torch.device("cuda") if device is None else device


class Linear(_TEModule):
    def __init__(self, in_features, out_features, sequence_parallel=False, fuse_wgrad_accumulation=False,
                 tp_group=None, tp_size=1, get_rng_state_tracker=None, rng_tracker_name=None, init_method=None,
                 bias=True, return_bias=False, params_dtype=None, parallel_mode=None, parameters_split=None,
                 device="cuda", ub_overlap_ag=False, ub_overlap_rs=False, ub_name=None, name=None):
        super().__init__()
        self.device_arg = device
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device,
                                               dtype=params_dtype or torch.get_default_dtype()))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device))
        else:  # as TE: an empty plain tensor, not a parameter
            self.bias = torch.Tensor().to(device=device)
        self.use_bias = bias
        if device != "meta":  # TE defers its init only for device == "meta"
            nn.init.normal_(self.weight, std=0.023)

    def forward(self, inp, is_first_microbatch=None, fp8_output=False):
        return F.linear(inp, self.weight, self.bias if self.use_bias else None)


class RMSNorm(_TEModule):
    def __init__(self, normalized_shape=None, eps=1e-5, sequence_parallel=None, params_dtype=None,
                 zero_centered_gamma=False, hidden_size=None, *, device=None, dtype=None, sm_margin=0):
        super().__init__()
        self.eps, self.zero_centered_gamma, self.device_arg = eps, zero_centered_gamma, device
        shape = normalized_shape if normalized_shape is not None else hidden_size
        self.weight = nn.Parameter(torch.empty(shape, device=_cuda_default(device), dtype=dtype or params_dtype))
        if self.weight.device.type != "meta":
            with torch.no_grad():
                self.weight.fill_(0.0 if zero_centered_gamma else 1.0)

    def forward(self, inp):
        xf = inp.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(inp.dtype)
        gamma = 1 + self.weight if self.zero_centered_gamma else self.weight
        return gamma * y


class DotProductAttention(_TEModule):
    calls: list[str] = []

    def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0,
                 qkv_format="sbhd", attn_mask_type="causal", window_size=None, sequence_parallel=False, tp_size=1,
                 get_rng_state_tracker=None, tp_group=None, layer_number=None, attention_type="self",
                 cp_group=None, cp_global_ranks=None, cp_stream=None, cp_comm_type="p2p", softmax_scale=None,
                 softmax_type="vanilla", name=None):
        super().__init__()
        assert attention_dropout == 0.0 and softmax_type == "vanilla"
        self.h, self.d = num_attention_heads, kv_channels
        self.g = num_gqa_groups or num_attention_heads
        self.qkv_format, self.attn_mask_type = qkv_format, attn_mask_type

    def forward(self, query_layer, key_layer, value_layer, attention_mask=None, qkv_format=None,
                cu_seqlens_q=None, cu_seqlens_kv=None, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None,
                max_seqlen_q=None, max_seqlen_kv=None, attn_mask_type=None, window_size=None,
                checkpoint_core_attention=False, core_attention_bias_type="no_bias", core_attention_bias=None,
                alibi_slopes=None, fast_zero_fill=True, inference_params=None, pad_between_seqs=None):
        fmt, kind = qkv_format or self.qkv_format, attn_mask_type or self.attn_mask_type
        q, k, v = query_layer, key_layer, value_layer
        assert q.shape[-2:] == (self.h, self.d) and k.shape[-2:] == v.shape[-2:] == (self.g, self.d)
        rep = self.h // self.g
        self.calls.append(fmt)

        def attend(q4, k4, v4, causal):  # (B, S, H, D) -> (B, S, H * D)
            q4, k4, v4 = (t.transpose(1, 2) for t in (q4, k4, v4))
            k4, v4 = k4.repeat_interleave(rep, 1), v4.repeat_interleave(rep, 1)
            out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=causal)
            return out.transpose(1, 2).flatten(2)

        if fmt in ("bshd", "sbhd"):
            assert q.dim() == 4 and kind in ("causal", "no_mask") and cu_seqlens_q is None
            if fmt == "sbhd":
                q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            out = attend(q, k, v, kind == "causal")
            return out.transpose(0, 1) if fmt == "sbhd" else out
        assert fmt == "thd" and q.dim() == 3 and kind in ("padding", "padding_causal"), (fmt, kind)
        cu = cu_seqlens_q
        assert cu.dtype == torch.int32 and cu.dim() == 1 and int(cu[-1]) == q.shape[0]
        assert cu_seqlens_kv is cu or torch.equal(cu_seqlens_kv, cu)
        lengths = (cu[1:] - cu[:-1]).tolist()
        assert max_seqlen_q == max_seqlen_kv == max(lengths)
        outs = [attend(q[None, a:e], k[None, a:e], v[None, a:e], kind == "padding_causal")[0]
                for a, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
        return torch.cat(outs, 0)


class autocast:  # noqa: N801 - TE's name
    entered: list = []

    def __init__(self, enabled=True, calibrating=False, recipe=None, amax_reduction_group=None, _graph=False):
        self.args = dict(enabled=enabled, recipe=recipe, group=amax_reduction_group)

    def __enter__(self):
        autocast.entered.append(self.args)
        return self

    def __exit__(self, *exc):
        return None


def fp8_autocast(enabled=True, calibrating=False, fp8_recipe=None, fp8_group=None, _graph=False):
    autocast.entered.append({"legacy": True, "recipe": fp8_recipe, "group": fp8_group})
    return contextlib.nullcontext()


class Format:
    E4M3, E5M2, HYBRID = "E4M3", "E5M2", "HYBRID"


class DelayedScaling(SimpleNamespace):
    def __init__(self, margin=0, fp8_format=Format.HYBRID, amax_history_len=1024, amax_compute_algo="max",
                 scaling_factor_compute_algo=None):
        super().__init__(fp8_format=fp8_format, amax_history_len=amax_history_len,
                         amax_compute_algo=amax_compute_algo)


class Float8CurrentScaling(SimpleNamespace):
    def __init__(self, fp8_format=Format.HYBRID):
        super().__init__(fp8_format=fp8_format)


def _install(monkeypatch, *, fp8_ok=True, new_autocast=True, current=True):
    root = types.ModuleType("transformer_engine")
    pt = types.ModuleType("transformer_engine.pytorch")
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")
    pt.Linear, pt.RMSNorm, pt.DotProductAttention, pt.fp8_autocast = Linear, RMSNorm, DotProductAttention, fp8_autocast
    if new_autocast:
        pt.autocast = autocast
    pt.is_fp8_available = lambda return_reason=False: (fp8_ok, "no FP8 here") if return_reason else fp8_ok
    recipe.Format, recipe.DelayedScaling = Format, DelayedScaling
    if current:
        recipe.Float8CurrentScaling = Float8CurrentScaling
    root.pytorch, root.common, common.recipe = pt, common, recipe
    for name, mod in (("transformer_engine", root), ("transformer_engine.pytorch", pt),
                      ("transformer_engine.common", common), ("transformer_engine.common.recipe", recipe)):
        monkeypatch.setitem(sys.modules, name, mod)
    te_mod._recipe.cache_clear()
    autocast.entered.clear()
    DotProductAttention.calls.clear()
    return pt


@pytest.fixture
def fake_te(monkeypatch):
    yield _install(monkeypatch)
    te_mod._recipe.cache_clear()


CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=96, norm_eps=1e-6)
GQA = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, norm_eps=1e-6)


def _pair(cfg: ModelConfig, seed: int = 0):
    """A DecoderBlock with random weights (norms too) and a TEDecoderBlock holding the same values."""
    torch.manual_seed(seed)
    ref = DecoderBlock(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0.0))
    blk = te_mod.TEDecoderBlock(cfg)
    blk.load_state_dict(ref.state_dict(), strict=True)
    return ref, blk


# ---------------------------------------------------------------------------------------------------------------
# without transformer-engine


def test_without_te_one_line_user_error(monkeypatch):
    for name in ("transformer_engine", "transformer_engine.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)  # "import transformer_engine" raises ImportError
    for make in (te_mod.require_te, lambda: te_mod.TEDecoderBlock(CFG)):
        with pytest.raises(UserError) as ei:
            make()
        msg = str(ei.value)
        assert "\n" not in msg and msg.startswith("model.impl=te needs transformer-engine (pip install"), msg
        assert "CUDA GPU" in msg and "not importable here: ModuleNotFoundError" in msg
    cfg = SimpleNamespace(parallel=SimpleNamespace(fp8=True, fp8_recipe="delayed"))
    with pytest.raises(UserError, match="transformer-engine"):
        te_mod.fp8_context(cfg)
    assert isinstance(te_mod.fp8_context(SimpleNamespace(parallel=SimpleNamespace(fp8=False))),
                      contextlib.nullcontext)


# ---------------------------------------------------------------------------------------------------------------
# config rules


def _config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(TINY / "stage2.yaml", list(overrides))
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("config error: "), msg
    return msg


def test_config_fp8_needs_te_and_te_refuses_tp():
    assert "parallel.fp8" in _config_error("parallel.fp8=true") and "model.impl=te" in _config_error(
        "parallel.fp8=true")
    msg = _config_error("model.impl=te", "parallel.tp=2")
    assert msg.startswith("config error: parallel.tp:") and "DCP" in msg
    # the tiny ffn_dim (344) is no multiple of 16: FP8 GEMMs refuse it
    assert "divisible by 16" in _config_error("model.impl=te", "parallel.fp8=true")
    # te composes with pp and dp; fp8 with te and FP8-friendly widths is accepted
    assert load_config(TINY / "stage2.yaml", ["model.impl=te", "parallel.pp=2"]).model.impl == "te"
    cfg = load_config(TINY / "stage2.yaml", ["model.impl=te", "parallel.fp8=true", "parallel.fp8_recipe=current",
                                             "model.ffn_dim=352", "parallel.dp=2"])
    assert cfg.parallel.fp8 and cfg.parallel.fp8_recipe == "current"


# ---------------------------------------------------------------------------------------------------------------
# TEDecoderBlock with the fake TE


@pytest.mark.parametrize("cfg", [CFG, GQA], ids=["mha", "gqa"])
def test_same_names_shapes_and_state_dict_keys(fake_te, cfg):
    ref, blk = _pair(cfg)
    assert [(n, p.shape) for n, p in blk.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    # TE's extra state (FP8 metadata) stays out: a checkpoint of either impl loads into the other, strictly
    assert list(blk.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(blk.state_dict(), strict=True)
    # the same through DCP's state-dict helpers (what the checkpointer calls)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    te_model, torch_model = nn.ModuleDict({"0": blk}), nn.ModuleDict({"0": ref})
    assert sorted(get_model_state_dict(te_model)) == sorted(get_model_state_dict(torch_model))
    set_model_state_dict(te_model, get_model_state_dict(torch_model))
    set_model_state_dict(torch_model, get_model_state_dict(te_model))
    assert not blk.attention_norm.zero_centered_gamma and blk.attention_norm.eps == cfg.norm_eps
    assert not blk.attention.wq.use_bias


def test_builds_on_the_default_device(fake_te):
    with torch.device("meta"):
        blk = te_mod.TEDecoderBlock(CFG)
    assert all(p.is_meta for p in blk.parameters())
    assert blk.attention.wq.device_arg == "meta" and blk.ffn_norm.device_arg == "meta"  # TE defers its own init
    h = torch.empty(2, 8, CFG.dim, device="meta")
    assert blk(h).shape == h.shape  # the pipeline's shape-only pass
    blk.to_empty(device="cpu")
    ref, _ = _pair(CFG)
    blk.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, CFG.dim)
    torch.testing.assert_close(blk(x), ref(x))


def _packed_inputs(b: int = 2, s: int = 24, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lengths = [[5, 9, 7, 3], [11, 6, 7]]  # row 0: three documents + padding (id 0); row 1: three documents
    doc_ids = torch.cat([torch.cat([torch.full((n,), i + 1 if (r, i) != (0, 3) else 0) for i, n in enumerate(ls)])
                         [None] for r, ls in enumerate(lengths)])
    positions = torch.cat([torch.cat([torch.arange(n) for n in ls])[None] for ls in lengths])
    return torch.randn(b, s, CFG.dim, generator=g), doc_ids, positions


@pytest.mark.parametrize("cfg", [CFG, GQA], ids=["mha", "gqa"])
def test_unpacked_rows_match_decoder_block(fake_te, cfg):
    ref, blk = _pair(cfg)
    x = torch.randn(2, 16, cfg.dim, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    rope = rotary_cos_sin(torch.arange(16).expand(2, -1), cfg.head_dim, cfg.rope_theta)
    out_ref, out = ref(x, rope, None), blk(x2, rope, None)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(blk(x2), ref(x))  # default positions (rope None)
    assert set(DotProductAttention.calls) == {"bshd"}
    out_ref.square().sum().backward()
    out.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)
    grads = dict(blk.named_parameters())
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n].grad, p.grad, msg=n)


@pytest.mark.parametrize("kind", ["varlen", "sdpa_mask"])
@pytest.mark.parametrize("cfg", [CFG, GQA], ids=["mha", "gqa"])
def test_packed_rows_match_decoder_block(fake_te, cfg, kind):
    """varlen masks go to TE's thd attention over cu_seqlens; other masks fall back to mask.attend."""
    ref, blk = _pair(cfg)
    x, doc_ids, positions = _packed_inputs()
    rope = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    mask = document_mask(doc_ids, kind)
    x.requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    out_ref, out = ref(x, rope, mask), blk(x2, rope, mask)
    torch.testing.assert_close(out, out_ref)
    assert DotProductAttention.calls == (["thd"] if kind == "varlen" else [])
    out_ref.square().sum().backward()
    out.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)
    grads = dict(blk.named_parameters())
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n].grad, p.grad, msg=n)


def test_generation_cache_matches(fake_te):
    ref, blk = _pair(GQA)
    x = torch.randn(1, 10, GQA.dim)
    c_ref, c = KVCache(), KVCache()
    torch.testing.assert_close(blk(x[:, :7], cache=c), ref(x[:, :7], cache=c_ref))
    torch.testing.assert_close(blk(x[:, 7:], cache=c), ref(x[:, 7:], cache=c_ref))
    assert c.length == c_ref.length == 10


# ---------------------------------------------------------------------------------------------------------------
# FP8 selection


def _fp8(recipe: str = "delayed", on: bool = True):
    return SimpleNamespace(parallel=SimpleNamespace(fp8=on, fp8_recipe=recipe))


def test_fp8_context_recipes(fake_te, monkeypatch):
    assert isinstance(te_mod.fp8_context(_fp8(on=False)), contextlib.nullcontext)
    with te_mod.fp8_context(_fp8("delayed"), group="dp-group"):
        pass
    args = autocast.entered[-1]
    assert args["enabled"] and args["group"] == "dp-group" and isinstance(args["recipe"], DelayedScaling)
    assert (args["recipe"].fp8_format, args["recipe"].amax_history_len, args["recipe"].amax_compute_algo) == (
        "HYBRID", 1024, "max")
    with te_mod.fp8_context(_fp8("current")):
        pass
    assert isinstance(autocast.entered[-1]["recipe"], Float8CurrentScaling)
    # an older TE: only fp8_autocast(fp8_recipe=...), no Float8CurrentScaling
    _install(monkeypatch, new_autocast=False, current=False)
    with te_mod.fp8_context(_fp8("delayed")):
        pass
    assert autocast.entered[-1]["legacy"] and isinstance(autocast.entered[-1]["recipe"], DelayedScaling)
    with pytest.raises(UserError, match="Float8CurrentScaling") as ei:
        te_mod.fp8_context(_fp8("current"))
    assert "\n" not in str(ei.value)


def test_enable_fp8_wraps_each_block_forward(fake_te, monkeypatch):
    model = nn.ModuleDict({"a": te_mod.TEDecoderBlock(CFG), "b": DecoderBlock(CFG), "c": te_mod.TEDecoderBlock(CFG)})
    assert te_mod.enable_fp8(model, _fp8(on=False)) == 0
    x = torch.randn(1, 8, CFG.dim)
    model["a"](x)
    assert autocast.entered == []
    assert te_mod.enable_fp8(model, _fp8("current")) == 2
    model["a"](x)
    model["c"](x)
    assert len(autocast.entered) == 2 and all(isinstance(a["recipe"], Float8CurrentScaling) for a in autocast.entered)
    _install(monkeypatch, fp8_ok=False)
    with pytest.raises(UserError, match="FP8-capable GPU"):
        te_mod.enable_fp8(model, _fp8())


def test_engine_step_with_te_blocks_equals_torch_blocks(fake_te):
    """model.impl=te through the whole engine (model build on meta, init by parameter name, packed rows, one
    optimizer step's forward/backward): the same loss and gradients as model.impl=torch."""
    from vlpretrain.config import load_config
    from vlpretrain.data.synthetic import synthetic_microbatches
    from vlpretrain.parallel.engine import ParallelModel
    from vlpretrain.parallel.mesh import ParallelContext, resolve_layout

    results = {}
    for impl in ("torch", "te"):
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "stage2.yaml",
                          [f"model.impl={impl}", "train.seq_len=128", "train.global_batch_size=2",
                           "train.micro_batch_size=2", "data.packing=true"])
        model = ParallelModel(cfg, ParallelContext(resolve_layout(cfg, 1), torch.device("cpu"), None))
        assert all(type(b).__name__ == ("TEDecoderBlock" if impl == "te" else "DecoderBlock")
                   for b in model.modules[0].layers.values())
        mbs, n = synthetic_microbatches(cfg, seed=0, images_per_sample=1, documents=3)
        loss = model.forward_backward(mbs, n)
        results[impl] = (loss, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    assert "thd" in DotProductAttention.calls  # packed rows reached TE's varlen attention
    assert results["te"][0] == pytest.approx(results["torch"][0], rel=1e-6)
    for k, g in results["torch"][1].items():
        torch.testing.assert_close(results["te"][1][k], g, atol=1e-6, rtol=1e-5, msg=k)
