"""Published GPU runs (``../shared/published_runs/calibration.csv`` and any CSV with its columns) as cost-model
inputs: which rows the planner can evaluate (and why not the others), each row's parts and layout, its
predicted step, and the efficiency that would reproduce its measured throughput (what the fit collects).

Evaluated: language-model rows (llama, gpt, mpt) in 16-bit on a GPU the cluster presets know, with tp, pp, dp,
the global batch and a micro batch (or ``GA=`` in the notes) and a published tokens/s per GPU. Skipped, with the
reason: context parallelism (the engine has none), fp8 / fp4 (Transformer Engine kernels; the model fits bf16),
vision-language rows (partial layouts), rows without tokens/s, unknown GPUs, missing degrees.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from vlpretrain.errors import UserError
from vlpretrain.planning.cluster import PRESETS, Cluster, get_cluster
from vlpretrain.planning.cost import LayoutSpec, Part, estimate

COLUMNS = ("source", "source_location", "model", "arch", "params_b", "layers", "hidden", "ffn", "heads",
           "kv_heads", "vocab", "seq_len", "gpu", "gpus", "gpus_per_node", "precision", "global_batch_seqs",
           "micro_batch", "tp", "pp", "vpp", "cp", "dp", "fsdp", "activation_checkpointing", "compile",
           "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "memory_gib_per_gpu", "notes")
_GPUS = (("GB300", "gb300"), ("GB200", "gb200"), ("B200", "b200"), ("A100-40GB", "a100-40gb"),
         ("A100", "a100-80gb"), ("H200", "h200"), ("H100", "h100-sxm"), ("Hopper", "h100-sxm"))
_BF16 = ("bf16", "amp_bf16", "mixed (16-bit)", "", "unstated")


@dataclass(frozen=True)
class Run:
    line: int  # line in the CSV (header = 1)
    key: str  # identifies the row across files: model, GPU, layout, batch and the published throughput
    row: dict
    cluster: Cluster
    lay: LayoutSpec
    parts: tuple[Part, ...]
    tokens_per_step: float
    model_flops: float
    measured_tokens_per_s: float
    measured_memory_gib: float | None

    @property
    def width(self) -> float:
        return int(self.row["hidden"]) / self.lay.tp


def read_csv(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--csv: {path} is not a file")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)} (see published_runs/README.md)")
        return list(reader)


def _int(v: str) -> int | None:
    return int(v) if re.fullmatch(r"\d+", v.strip() or "x") else None


def _gpu(name: str) -> str | None:
    return next((preset for key, preset in _GPUS if key in name), None)


def _skip_reason(r: dict) -> str | None:
    if r["arch"] not in ("llama", "gpt", "mpt"):
        return f"arch {r['arch'] or '?'}: not a language model alone"
    if (_int(r["cp"]) or 1) > 1:
        return f"context parallelism cp={r['cp']} (the engine has none)"
    if r["precision"].strip().lower() not in _BF16 and not r["precision"].startswith("unstated"):
        return f"precision {r['precision']} (Transformer Engine kernels; the model is fitted to 16-bit)"
    if not r["tokens_per_s_per_gpu"].strip():
        return "no tokens/s per GPU published"
    if _gpu(r["gpu"]) is None:
        return f"unknown GPU {r['gpu']!r}"
    for k in ("layers", "hidden", "heads", "vocab", "seq_len", "gpus", "global_batch_seqs", "tp", "pp", "dp"):
        if _int(r[k]) is None:
            return f"{k} not given"
    if r["vpp"].strip() and _int(r["vpp"]) is None:
        return f"vpp {r['vpp']!r}"
    if _int(r["tp"]) * _int(r["pp"]) * _int(r["dp"]) != _int(r["gpus"]):
        return "tp x pp x dp != gpus as published"
    if _micro(r) is None:
        return "micro batch not given"
    return None


def _micro(r: dict) -> int | None:
    mb = _int(r["micro_batch"])
    if mb is not None:
        return mb
    m = re.search(r"GA=(\d+)", r["notes"])
    if m:
        per = int(r["global_batch_seqs"]) // (int(r["dp"]) * int(m.group(1)))
        return per if per >= 1 else None
    return None


def _sharding(r: dict) -> str:
    f = r["fsdp"].lower()
    if f.startswith("yes") or "zero-3" in f:
        return "fsdp"
    return "zero1"  # Megatron / NeMo: distributed optimizer; ZeRO-2 shards grads and states alike


def row_parts(r: dict, tp: int, b: int, full_ac: bool) -> tuple[list[Part], float]:
    """The parts of a published language model (module doc) and its model FLOPs per sequence (fwd + bwd,
    attention counted in full as the MFU convention does)."""
    h, n_layers, heads, vocab, s = (int(r[k]) for k in ("hidden", "layers", "heads", "vocab", "seq_len"))
    kv = _int(r["kv_heads"]) or heads
    gated = r["arch"] == "llama"
    ffn = _int(r["ffn"]) or 4 * h
    hd = h // heads
    dense = h * (2 * heads * hd + 2 * kv * hd) + (3 if gated else 2) * h * ffn
    attn = 4 * s * heads * hd  # per token, full S x S
    layer_fwd = b * s * (2 * dense + 0.5 * attn) / tp
    layer_attn = b * s * 0.5 * attn / tp * (4 if full_ac else 3)
    head_fwd = b * 2 * s * h * vocab / tp
    sbh = b * s * h
    act = 2 * sbh / tp if full_ac else 34 * sbh / tp
    layer = Part("layer", layer_fwd * (4 if full_ac else 3), layer_fwd, layer_attn, h // tp, dense / tp, dense / tp,
                 act, tp_bytes=2 * sbh, tp_colls=(12 if full_ac else 8) if tp > 1 else 0)
    head = Part("head", 3 * head_fwd, head_fwd, 0.0, h // tp, h * vocab / tp, h * vocab / tp,
                b * s * (4 * h + 4 * vocab / tp))
    embed = Part("embed", 0.0, 0.0, 0.0, h, vocab * h, vocab * h, 2 * sbh)
    model_flops = 3 * (n_layers * s * (2 * dense + attn) + 2 * s * h * vocab)
    return [embed, *[layer] * n_layers, head], model_flops


def load_runs(rows: list[dict]) -> tuple[list[Run], list[tuple[int, str, str]]]:
    """(evaluable runs, [(line, model, reason)] for the rest)."""
    runs, skipped = [], []
    for i, r in enumerate(rows):
        line = i + 2
        why = _skip_reason(r)
        if why is not None:
            skipped.append((line, r.get("model", ""), why))
            continue
        tp, pp, dp = int(r["tp"]), int(r["pp"]), int(r["dp"])
        vpp = _int(r["vpp"]) or 1
        b, gbs, s = _micro(r), int(r["global_batch_seqs"]), int(r["seq_len"])
        n_layers = int(r["layers"])
        full_ac = r["activation_checkpointing"].lower().startswith("yes")
        parts, per_seq = row_parts(r, tp, b, full_ac)
        n_mb = max(gbs // (b * dp), 1)
        v = pp * vpp
        base, rem = divmod(n_layers, v)
        split = tuple(base + (1 if k < rem else 0) for k in range(v))
        sched = "interleaved_1f1b" if vpp > 1 else "1f1b"
        lay = LayoutSpec(tp=tp, pp=pp, vpp=vpp, dp=dp, schedule=sched, n_microbatches=n_mb, split=split,
                         boundary_bytes=2 * b * s * int(r["hidden"]), sharding=_sharding(r),
                         reduce_bytes=2 if "MP mode" in r["notes"] else 4)  # Composer reduces in bf16
        gpn = _int(r["gpus_per_node"])
        cl = get_cluster(_gpu(r["gpu"]), gpus_per_node=gpn if gpn else None)
        key = "|".join(r[k] for k in ("model", "gpu", "gpus", "seq_len", "global_batch_seqs", "micro_batch", "tp",
                                      "pp", "vpp", "dp", "precision", "activation_checkpointing",
                                      "tokens_per_s_per_gpu"))
        mem = float(r["memory_gib_per_gpu"]) if r["memory_gib_per_gpu"].strip() else None
        runs.append(Run(line, key, r, cl, lay, tuple(parts), gbs * s, gbs * per_seq,
                        float(r["tokens_per_s_per_gpu"]), mem))
    return runs, skipped


def predict_run(run: Run, eff, attention_ratio: float = 1.0) -> dict:
    """``cost.estimate`` of a published run; ``eff``: width -> efficiency (a float: the same for every part)."""
    fn = eff if callable(eff) else (lambda _w: eff)
    return estimate(list(run.parts), run.lay, run.cluster, fn, run.tokens_per_step, run.model_flops,
                    attention_ratio)


def implied_efficiency(run: Run, attention_ratio: float = 1.0, lo: float = 0.02, hi: float = 1.5) -> float:
    """The one efficiency for every part at which the model reproduces the run's measured tokens/s (bisection
    on a monotone function; clipped to [lo, hi])."""
    target = run.measured_tokens_per_s
    for _ in range(50):
        mid = (lo + hi) / 2
        if predict_run(run, mid, attention_ratio)["tokens_per_s_per_gpu"] < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


__all__ = ["PRESETS", "Run", "implied_efficiency", "load_runs", "predict_run", "read_csv", "row_parts"]
