"""transformer-engine decoder blocks (``model.impl: te``) and FP8 training (``parallel.fp8``), optional.

``TEDecoderBlock`` is ``llm.DecoderBlock`` built from transformer-engine (TE) modules, with EXACTLY the same
parameter names and shapes (``attention_norm.weight``, ``attention.wq.weight`` ... ``feed_forward.w3.weight``,
``ffn_norm.weight``), so checkpoints, ``models/init.py`` (values by parameter name), FSDP2 sharding and DCP
resharding treat both implementations alike: a run can resume with the other ``model.impl``.

- the seven projections are ``te.Linear(bias=False)``, the two norms ``te.RMSNorm`` (``zero_centered_gamma``
  off: TE would otherwise learn gamma - 1 under the same name), the attention core ``te.DotProductAttention``:
  ``bshd`` causal for unpacked rows; packed rows use the ``thd`` format over the varlen mask's ``cu_seqlens``
  (``padding_causal``: one causal sequence per document, no S x S mask). Another mask object (flex, dense)
  and the generation KV cache fall back to plain torch attention (``mask.attend`` / SDPA).
- rotary embeddings are ours (``llm.apply_rotary`` on the model's shared cos/sin tables), as in DecoderBlock.
- NOT fused: TE's ``LayerNormLinear`` / ``LayerNormMLP`` would fuse the norm into the next projections, but they
  own the norm weight as ``layer_norm_weight`` of the projection module and want q/k/v (and w1/w3) as ONE weight:
  ``attention_norm.weight`` + ``attention.wq/wk/wv.weight`` would become e.g. ``attention.wqkv.layer_norm_weight``
  + ``attention.wqkv.weight``. That breaks the identical-names contract above (checkpoints, per-name init,
  resume across impls), so the documented choice is unfused modules with our names. The cost: the norm output
  is written in bf16 and quantised by the next Linear, instead of the norm emitting FP8 directly.
- TE keeps FP8 scaling metadata as ``_extra_state`` entries in ``state_dict()``; the block drops them, so the
  checkpoint holds exactly DecoderBlock's keys. A resume therefore restarts the delayed-scaling amax history
  (as at step 0; current scaling has no history).

Layouts: TE modules here are plain ``nn.Module``s with our names, so pipeline cuts (``layers.<i>`` parts) and
FSDP2 (``fully_shard`` of the blocks; TE supports DTensor parameters) compose unchanged. Tensor parallelism
does NOT: ours shards ``nn.Linear`` weights as DTensors through ``parallelize_module``, which TE's kernels do
not take, and TE's own TP groups would make the parameters plain local shards that DCP cannot reshard on a
layout-change resume; ``config.validate`` refuses ``model.impl=te`` with ``parallel.tp > 1``.

FP8: ``fp8_context(cfg)`` is TE's autocast with the configured recipe (or a null context); ``enable_fp8``
makes every TE block of a module enter it around its own forward, so that each region sees one call of each
module (TE's rule for delayed scaling with amax reduction) and backward runs outside it, whatever the pipeline
schedule interleaves.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from vlpretrain.config import ModelConfig
from vlpretrain.errors import UserError
from vlpretrain.models.llm import KVCache, apply_rotary, rotary_cos_sin

INSTALL = "pip install transformer-engine[pytorch]"
_EXTRA = nn.modules.module._EXTRA_STATE_KEY_SUFFIX  # "_extra_state"


def require_te():
    """``transformer_engine.pytorch``, or a one-line UserError saying what is missing."""
    try:
        import transformer_engine.pytorch as te
    except Exception as e:  # ImportError, or OSError / RuntimeError from its CUDA libraries
        why = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"model.impl=te needs transformer-engine ({INSTALL}) and a CUDA GPU; not importable "
                        f"here: {type(e).__name__}: {why}") from None
    return te


def _device_arg():
    """The device to build on: the current default (the model is built under ``torch.device("meta")``).
    Given as the string "meta" there, since TE's Linear defers its own init only on ``device == "meta"``."""
    dev = torch.get_default_device()
    return "meta" if dev.type == "meta" else dev


class TEAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, te, device):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.n_rep = cfg.n_heads // cfg.kv_heads
        self.wq = te.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False, device=device)
        self.wk = te.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False, device=device)
        self.wv = te.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False, device=device)
        self.wo = te.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False, device=device)
        # no parameters (vanilla softmax); GQA natively (num_gqa_groups), no repeated k / v
        self.core = te.DotProductAttention(cfg.n_heads, cfg.head_dim, num_gqa_groups=cfg.kv_heads,
                                           attention_dropout=0.0, qkv_format="bshd", attn_mask_type="causal")

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask=None, cache: KVCache | None = None) -> torch.Tensor:
        """As ``llm.Attention.forward`` (same arguments, same result)."""
        b, s, _ = x.shape
        past = cache.length if cache is not None else 0
        if rope is None:
            rope = rotary_cos_sin(torch.arange(past, past + s, device=x.device).expand(b, -1), self.head_dim,
                                  self.rope_theta)
        cos, sin = rope
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        # our rotary works on (B, H, S, D): apply it to the transposed views and come back to (B, S, H, D)
        q = apply_rotary(q.transpose(1, 2), cos, sin).transpose(1, 2).contiguous()
        k = apply_rotary(k.transpose(1, 2), cos, sin).transpose(1, 2).contiguous()
        if cache is not None or (mask is not None and getattr(mask, "cu_seqlens", None) is None):
            out = self._torch_attention(q, k, v, mask, cache)
        elif mask is None:  # unpacked rows: causal
            out = self.core(q, k, v, qkv_format="bshd", attn_mask_type="causal")
        else:  # packed rows: one causal sequence per document over the flat (B * S) tokens
            t = b * s
            out = self.core(q.reshape(t, -1, self.head_dim), k.reshape(t, -1, self.head_dim),
                            v.reshape(t, -1, self.head_dim), qkv_format="thd",
                            attn_mask_type="padding_causal", cu_seqlens_q=mask.cu_seqlens,
                            cu_seqlens_kv=mask.cu_seqlens, max_seqlen_q=mask.max_seqlen,
                            max_seqlen_kv=mask.max_seqlen)
        return self.wo(out.reshape(b, s, -1))

    def _torch_attention(self, q, k, v, mask, cache: KVCache | None) -> torch.Tensor:
        """(B, S, H, D) -> (B, S, H * D) by ``llm.Attention``'s torch path: a mask object without cu_seqlens,
        or generation with a KV cache."""
        b, s = q.shape[:2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        past = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.append(k, v)
        if self.n_rep > 1:
            k = k.repeat_interleave(self.n_rep, dim=1)
            v = v.repeat_interleave(self.n_rep, dim=1)
        if mask is not None:
            out = mask.attend(q, k, v)
        elif past:
            causal = torch.ones(s, past + s, dtype=torch.bool, device=q.device).tril(past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(b, s, -1)


class TEFeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int, te, device):
        super().__init__()
        self.w1 = te.Linear(dim, hidden, bias=False, device=device)
        self.w2 = te.Linear(hidden, dim, bias=False, device=device)
        self.w3 = te.Linear(dim, hidden, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TEDecoderBlock(nn.Module):
    """``llm.DecoderBlock`` from TE modules: same parameter names, shapes, forward signature and function."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        te = require_te()
        device = _device_arg()
        self.attention_norm = te.RMSNorm(cfg.dim, eps=cfg.norm_eps, zero_centered_gamma=False, device=device)
        self.attention = TEAttention(cfg, te, device)
        self.ffn_norm = te.RMSNorm(cfg.dim, eps=cfg.norm_eps, zero_centered_gamma=False, device=device)
        self.feed_forward = TEFeedForward(cfg.dim, cfg.ffn_dim, te, device)
        # the FP8 region each forward enters (``enable_fp8``); a plain attribute, not state
        self.fp8_region = contextlib.nullcontext
        self.register_state_dict_post_hook(_drop_extra_state)
        self.register_load_state_dict_post_hook(_allow_missing_extra_state)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, mask=None,
                cache: KVCache | None = None) -> torch.Tensor:
        if h.is_meta:  # shape-only pass (pipeline shape inference): TE kernels take no meta tensors
            return torch.empty_like(h)
        kw = {"cache": cache} if cache is not None else {}
        with self.fp8_region():
            h = h + self.attention(self.attention_norm(h), rope, mask, **kw)
            return h + self.feed_forward(self.ffn_norm(h))


def _drop_extra_state(module, state_dict, prefix, local_metadata) -> None:
    """TE's FP8 metadata (``<module>._extra_state``) stays out of checkpoints: the keys equal DecoderBlock's."""
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith(_EXTRA)]:
        del state_dict[key]


def _allow_missing_extra_state(module, incompatible_keys) -> None:
    """Loading a checkpoint (ours never hold TE extra state) strictly: its absence is not a missing key."""
    keys = incompatible_keys.missing_keys
    keys[:] = [k for k in keys if not k.endswith(_EXTRA)]


# ----------------------------------------------------------------------------------------------------------------
# FP8


@functools.cache
def _recipe(kind: str):
    try:
        from transformer_engine.common import recipe
    except Exception as e:
        raise UserError(f"parallel.fp8 needs transformer-engine ({INSTALL}): {type(e).__name__}: {e}") from None
    if kind == "delayed":  # TE's documented training defaults, spelled out (older versions defaulted otherwise)
        return recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID, amax_history_len=1024,
                                     amax_compute_algo="max")
    current = getattr(recipe, "Float8CurrentScaling", None)
    if current is None:
        raise UserError("parallel.fp8_recipe=current needs transformer-engine with "
                        "recipe.Float8CurrentScaling (2.2 or newer); upgrade it or use fp8_recipe=delayed")
    return current(fp8_format=recipe.Format.HYBRID)


def fp8_context(cfg, group=None):
    """A fresh context manager: TE's FP8 autocast with ``parallel.fp8_recipe`` when ``parallel.fp8``, else a
    null context. ``group``: the process group over which delayed scaling reduces amaxes (e.g. dp; None: each
    rank keeps its own). Recent TE calls it ``autocast(recipe=...)`` (``fp8_autocast`` deprecated), older
    versions only have ``fp8_autocast(fp8_recipe=...)``."""
    if not cfg.parallel.fp8:
        return contextlib.nullcontext()
    te = require_te()
    rec = _recipe(cfg.parallel.fp8_recipe)
    autocast = getattr(te, "autocast", None)
    if autocast is not None and "recipe" in inspect.signature(autocast).parameters:
        return autocast(enabled=True, recipe=rec, amax_reduction_group=group)
    fp8_autocast = getattr(te, "fp8_autocast", None)
    if fp8_autocast is None:
        raise UserError("parallel.fp8: this transformer-engine has neither transformer_engine.pytorch.autocast "
                        "nor fp8_autocast; install a supported version (" + INSTALL + ")")
    return fp8_autocast(enabled=True, fp8_recipe=rec, fp8_group=group)


def enable_fp8(module: nn.Module, cfg, group=None) -> int:
    """Make every TEDecoderBlock in ``module`` run its forward inside ``fp8_context(cfg, group)``; returns how
    many. A no-op (0) without ``parallel.fp8``. Fails with one line when this GPU cannot run FP8."""
    if not cfg.parallel.fp8:
        return 0
    te = require_te()
    available = getattr(te, "is_fp8_available", None)
    if available is not None:
        try:
            ok = available(return_reason=True)
        except TypeError:
            ok = (available(), "")
        ok, why = ok if isinstance(ok, tuple) else (ok, "")
        if not ok:
            raise UserError(f"parallel.fp8 needs an FP8-capable GPU (Hopper or newer): {why}")
    blocks = [m for m in module.modules() if isinstance(m, TEDecoderBlock)]
    for block in blocks:
        block.fp8_region = functools.partial(fp8_context, cfg, group)
    return len(blocks)
