"""Check (b) of ``bench/gpu_check.py``: document-causal attention of one packed row, per implementation.

``vlpretrain.models.attention.document_mask(doc_ids, kind)`` gives an object whose ``.attend(q, k, v)`` runs
attention over (B, H, S, D) rotated queries / keys / values; each kind is timed forward + backward with its
peak memory above the inputs, and its output and query gradient are compared with ``sdpa_mask``'s. Plain
causal SDPA (no documents: the flash kernel) is the floor.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from vlpretrain.config import Config
from vlpretrain.data.synthetic import synthetic_microbatches

KINDS = ("flex", "varlen", "sdpa_mask")
MIB = 2 ** 20


def attention_check(cfg: Config, device: torch.device, dtype: torch.dtype, documents: int, iters: int,
                    deadline: float, out: dict) -> dict:
    try:
        from vlpretrain.models.attention import document_mask
    except ImportError as e:  # being written: report, do not fail
        out["skipped"] = f"vlpretrain.models.attention.document_mask not available ({type(e).__name__}: {e})"
        return out
    m, s = cfg.model, cfg.train.seq_len
    (mb,), _ = synthetic_microbatches(cfg, seed=0, images_per_sample=0, num_samples=1, documents=documents)
    doc_ids = mb.doc_ids.to(device)
    out.update({"shape_bhsd": [1, m.n_heads, s, m.head_dim], "dtype": str(dtype).removeprefix("torch."),
                "documents": int(doc_ids.unique().numel()), "iters": iters})
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(1, m.n_heads, s, m.head_dim, generator=g, device=device, dtype=dtype)
                     for _ in range(4))
    results: dict[str, dict] = {}
    ref = None
    for kind in ("sdpa_mask", *[x for x in KINDS if x != "sdpa_mask"], "causal"):
        if time.perf_counter() > deadline:
            results[kind] = {"skipped": "time budget"}
            continue
        try:
            if kind == "causal":
                def attend(a, b, c):
                    return F.scaled_dot_product_attention(a, b, c, is_causal=True)
                build_ms = 0.0
            else:
                document_mask(doc_ids, kind)  # first build: anything it compiles or caches
                _sync(device)
                t0 = time.perf_counter()
                mask = document_mask(doc_ids, kind)
                _sync(device)
                build_ms = (time.perf_counter() - t0) * 1e3
                attend = mask.attend
            try:
                res = _time_fwd_bwd(attend, q, k, v, dout, device, iters)
            except RuntimeError as e:
                if device.type != "cpu":
                    raise
                # flex has no CPU backward: time the forward alone, so the smoke run still exercises it
                res = _time_fwd(attend, q, k, v, device, iters)
                res["no_backward"] = str(e).splitlines()[0][:200]
            res["mask_build_ms"] = round(build_ms, 3)
            if kind == "sdpa_mask":
                ref = (res.pop("_out"), res.pop("_dq"))
            elif kind != "causal" and ref is not None:
                o, dq = res.pop("_out"), res.pop("_dq")
                res["max_abs_diff_out"] = float((o.float() - ref[0].float()).abs().max())
                if dq is not None:
                    res["max_abs_diff_dq"] = float((dq.float() - ref[1].float()).abs().max())
            res.pop("_out", None)
            res.pop("_dq", None)
            results[kind] = res
        except Exception as e:  # one implementation failing does not hide the others
            results[kind] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    out["kinds"] = results
    base = results.get("sdpa_mask", {}).get("fwd_bwd_ms")
    for kind in ("flex", "varlen"):
        t = results.get(kind, {}).get("fwd_bwd_ms")
        if base and t:
            out[f"{kind}_speedup_vs_sdpa_mask"] = round(base / t, 3)
    return out


def _time_fwd_bwd(attend, q, k, v, dout, device: torch.device, iters: int) -> dict:
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    o = None
    for _ in range(2):  # warm-up: compilation (flex), kernel selection
        o = attend(q, k, v)
        o.backward(dout)
    out_copy, dq_copy = o.detach().clone(), q.grad.detach().clone()
    q.grad = k.grad = v.grad = None
    del o
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        attend(q, k, v).backward(dout)
        q.grad = k.grad = v.grad = None
    _sync(device)
    res = {"fwd_bwd_ms": round((time.perf_counter() - t0) / iters * 1e3, 3), "_out": out_copy, "_dq": dq_copy}
    if cuda:
        res["peak_extra_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / MIB, 1)
    return res


def _time_fwd(attend, q, k, v, device: torch.device, iters: int) -> dict:
    with torch.no_grad():
        o = attend(q, k, v)
        t0 = time.perf_counter()
        for _ in range(iters):
            attend(q, k, v)
        _sync(device)
    return {"fwd_ms": round((time.perf_counter() - t0) / iters * 1e3, 3), "_out": o, "_dq": None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
