"""Document-causal attention for packed rows, without an S x S mask where a kernel allows (``model.attention``).

A packed row holds several documents (contiguous runs of one document id, ``data/packing.py``); token i may
attend to token j iff j <= i and both lie in the same run. The mask object is built ONCE per forward from the
full-length document ids (``document_mask``) and every decoder block calls its ``attend(q, k, v)``:

- ``flex``: FlexAttention with a ``BlockMask`` made from per-block run ranges (O((S/128)^2) entries; blocks
  that are wholly inside one document skip the mask function). Compiled; torch has no FlexAttention backward
  on CPU, so on CPU it serves forward-only work (evaluation, the memory probe).
- ``varlen``: per-document causal attention over ``cu_seqlens``: torch's flash ``varlen_attn`` on CUDA in
  bf16/fp16, otherwise one causal SDPA call per document (the CPU flash kernel stores no scores).
- ``sdpa_mask``: SDPA with a dense (B, 1, S, S) bool mask (the reference the others are tested against).

All three see the same runs, so they compute the same function; tests/test_attention.py checks outputs and
gradients against ``sdpa_mask``.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

KINDS = ("flex", "varlen", "sdpa_mask")
FLEX_BLOCK = 128  # FlexAttention's default tile; the block mask is computed at this granularity
# CPU rows up to this length take the dense mask under ``auto``: one SDPA call per document costs ~1 ms of
# dispatch (forward + backward) on CPU, more than a mask of at most 1M entries (4 heads, 48-token documents:
# dense 2.4-3.9x faster at S = 256-512, 1.1x at 1024; varlen 1.6-9x faster from 2048)
CPU_DENSE_MAX_LEN = 1024


def resolve_kind(kind: str, device: torch.device, seq_len: int | None = None) -> str:
    """``auto``: flex on GPU (a fused, compiled kernel with block sparsity; varlen where torch has no flex); on
    CPU (where flex cannot train) the dense mask for rows of at most ``CPU_DENSE_MAX_LEN`` tokens, varlen for
    longer ones."""
    if kind != "auto":
        return kind
    if device.type == "cuda":
        return "flex" if _flex_available() else "varlen"
    return "sdpa_mask" if seq_len is not None and seq_len <= CPU_DENSE_MAX_LEN else "varlen"


def document_runs(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) document ids -> (B, S) nondecreasing run index: a new run starts wherever the id changes (so
    trailing padding, id 0, is a run of its own)."""
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be (B, S), got shape {tuple(doc_ids.shape)}")
    change = doc_ids[:, 1:] != doc_ids[:, :-1]
    return F.pad(change.long().cumsum(1), (1, 0))


def document_mask(doc_ids: torch.Tensor, kind: str = "auto"):
    """The attention of packed rows with these (B, S) document ids: an object with ``attend(q, k, v)``."""
    kind = resolve_kind(kind, doc_ids.device, doc_ids.shape[-1])
    if kind == "flex":
        return FlexDocumentMask(doc_ids)
    if kind == "varlen":
        return VarlenDocumentMask(doc_ids)
    if kind == "sdpa_mask":
        return DenseDocumentMask(doc_ids)
    raise ValueError(f"unknown attention kind {kind!r}; choose from auto, {', '.join(KINDS)}")


def dense_document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) document ids -> (B, 1, S, S) bool, True = may attend. Every row keeps its diagonal."""
    run = document_runs(doc_ids)
    s = run.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=run.device).tril()
    return ((run[:, :, None] == run[:, None, :]) & causal)[:, None]


class DenseDocumentMask:
    kind = "sdpa_mask"

    def __init__(self, doc_ids: torch.Tensor):
        self.mask = dense_document_causal_mask(doc_ids)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


class VarlenDocumentMask:
    """Documents as a flat list of (start, end) token ranges over the (B * S) tokens; one host sync per forward
    (here, not in every block) reads the boundaries."""

    kind = "varlen"

    def __init__(self, doc_ids: torch.Tensor):
        b, s = doc_ids.shape
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        flat = torch.nonzero(starts.flatten()).flatten()
        self.cu_seqlens = torch.cat([flat, flat.new_tensor([b * s])]).to(torch.int32)
        bounds = self.cu_seqlens.tolist()
        self.ranges = list(zip(bounds[:-1], bounds[1:]))
        self.max_seqlen = max(e - a for a, e in self.ranges)
        self.seq_len = s

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, s, d = q.shape
        kernel = _cuda_varlen() if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) else None
        if kernel is not None:  # (B, H, S, D) -> (B * S, H, D) tokens, flash over cu_seqlens
            q2, k2, v2 = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (q, k, v))
            out = kernel(q2, k2, v2, self.cu_seqlens, self.max_seqlen)
            return out.view(b, s, h, d).transpose(1, 2)
        outs = []
        for a, e in self.ranges:  # ranges never straddle rows: every row starts a run
            row, lo, hi = a // s, a % s, a % s + (e - a)
            outs.append(F.scaled_dot_product_attention(q[row:row + 1, :, lo:hi], k[row:row + 1, :, lo:hi],
                                                       v[row:row + 1, :, lo:hi], is_causal=True))
        # the ranges are in (row, position) order: their concatenation is the (B * S) token axis
        return torch.cat(outs, dim=2).view(h, b, s, d).transpose(0, 1)


class FlexDocumentMask:
    kind = "flex"

    def __init__(self, doc_ids: torch.Tensor):
        self.run = document_runs(doc_ids)
        self.block_mask = flex_block_mask(self.run)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise RuntimeError("model.attention=flex cannot train on CPU (torch has no FlexAttention backward "
                               "there); use varlen or sdpa_mask")
        return _compiled_flex()(q, k, v, block_mask=self.block_mask)


def flex_block_mask(run: torch.Tensor, block: int = FLEX_BLOCK):
    """The ``BlockMask`` of document-causal attention from (B, S) run indices, without the S x S mask.

    Runs are nondecreasing along a row, so a kv block j < query block i shares a document with it iff
    max(run in j) == min(run in i), and is FULL (every pair may attend: no mask function needed) iff both blocks
    lie wholly in that one run. The diagonal block and the last (possibly ragged) one are always partial.
    """
    from torch.nn.attention.flex_attention import BlockMask

    b, s = run.shape
    nb = -(-s // block)
    padded = F.pad(run, (0, nb * block - s), mode="replicate") if nb * block != s else run
    lo = padded.view(b, nb, block).amin(-1)
    hi = padded.view(b, nb, block).amax(-1)
    idx = torch.arange(nb, device=run.device)
    below = idx[None, :] < idx[:, None]  # [i, j]: kv block j strictly before query block i
    diag = idx[None, :] == idx[:, None]
    meets = hi[:, None, :] >= lo[:, :, None]  # [b, i, j]
    one_run = (lo[:, None, :] == hi[:, :, None])  # all of j and all of i in one run (lo_j == hi_i)
    ragged = (idx == nb - 1) if nb * block != s else torch.zeros_like(idx, dtype=torch.bool)
    full = below & one_run & ~ragged[:, None] & ~ragged[None, :]
    partial = (diag | (below & meets)) & ~full

    def pack(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = sel.sum(-1).to(torch.int32)[:, None]  # (B, 1, nb)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
        return counts, order  # selected kv blocks first, in order

    kv_num, kv_idx = pack(partial)
    full_num, full_idx = pack(full)

    def mask_mod(bi, hi_, q_idx, kv_idx_):
        return (run[bi, q_idx] == run[bi, kv_idx_]) & (q_idx >= kv_idx_)

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(s, s))


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    # eager flex materialises the scores; compiled it is a fused kernel (inside an already compiled block this
    # nested compile is inlined)
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _cuda_varlen():
    """torch's flash varlen kernel as f(q, k, v, cu_seqlens, max_seqlen), causal; None where this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}

    def run(q, k, v, cu, max_len):
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **causal)
    return run
