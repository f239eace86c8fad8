"""A run dir's logs as numpy columns: ``metrics.jsonl`` (one line per step), ``eval.jsonl``, ``summary.json``.

Parsing is the only per-line Python work (orjson when installed, else json: 10k steps in ~0.1 s); everything
after it is vectorised. Long curves are reduced to at most ``MAX_POINTS`` buckets (mean, min, max) before
plotting, so drawing time does not grow with the run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from vlpretrain.errors import UserError

try:  # optional: a few times faster than json on long logs
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads

MAX_POINTS = 1500
SCALARS = ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s", "mfu", "model_tflops",
           "consumed_samples", "images", "language_ratio_target", "language_ratio_realized", "bad_images",
           "skipped_samples", "rank_cost_imbalance", "rank_cost_imbalance_contiguous")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a line cut by a crash (the last one) or a non-object line is skipped."""
    if not path.is_file():
        return []
    out = []
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = _loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                out.append(rec)
    return out


@dataclass
class Run:
    name: str
    path: Path
    steps: np.ndarray  # int, one per logged step (sorted, last write of a step wins)
    cols: dict[str, np.ndarray]  # SCALARS -> float arrays (nan where a line lacks the key)
    is_text: np.ndarray  # bool: a language-only step
    sources: dict[str, np.ndarray]  # per-step sample counts per source
    bad_samples: dict[str, np.ndarray]  # per-step skipped samples per source
    evals: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    timeline: Path | None = None  # <run>/profile/timeline.png, if the run was profiled
    bubble: dict | None = None


def _dedupe(records: list[dict]) -> list[dict]:
    """One record per step, the last one written (a resumed run rewinds, but be safe), in step order."""
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def _dict_columns(records: list[dict], key: str) -> dict[str, np.ndarray]:
    names: dict[str, None] = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, dict):
            names.update(dict.fromkeys(v))
    out = {}
    for name in names:
        out[name] = np.fromiter(((r.get(key) or {}).get(name, 0) if isinstance(r.get(key), dict) else 0
                                 for r in records), dtype=np.float64, count=len(records))
    return out


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan


def load_run(path: str | Path, name: str | None = None) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"report: {path} is not a run directory")
    metrics_file, eval_file = path / "metrics.jsonl", path / "eval.jsonl"
    if not metrics_file.is_file() and not eval_file.is_file():
        raise UserError(f"report: {path} has no metrics.jsonl or eval.jsonl (is it a run dir?)")
    records = _dedupe(read_jsonl(metrics_file))
    n = len(records)
    cols = {k: np.fromiter((_num(r.get(k)) for r in records), dtype=np.float64, count=n) for k in SCALARS}
    is_text = np.fromiter((r.get("modality") == "text" for r in records), dtype=bool, count=n)
    steps = np.fromiter((r["step"] for r in records), dtype=np.int64, count=n)
    summary, config = {}, {}
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        pass
    timeline = path / "profile" / "timeline.png"
    bubble = None
    try:
        bubble = json.loads((path / "profile" / "bubble.json").read_text())
    except (OSError, ValueError):
        pass
    return Run(name=name or path.name, path=path, steps=steps, cols=cols, is_text=is_text,
               sources=_dict_columns(records, "source_counts"), bad_samples=_dict_columns(records, "bad_samples"),
               evals=_dedupe(read_jsonl(eval_file)), summary=summary if isinstance(summary, dict) else {},
               config=config if isinstance(config, dict) else {}, timeline=timeline if timeline.is_file() else None,
               bubble=bubble if isinstance(bubble, dict) else None)


def run_names(paths: list[Path]) -> list[str]:
    """Dir names; where two runs share one, the parent's name is prefixed (runs/a/s1 vs runs/b/s1)."""
    full = [p.resolve() for p in paths]
    names = [p.name if not any(q.name == p.name and q != p for q in full)  # other dirs of one name:
             else f"{p.parent.name}/{p.name}" for p in full]                   # their parents tell them apart
    seen: dict[str, int] = {}
    out = []
    for n in names:  # the same dir twice: number them
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def reduce(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS):
    """(x, mean, min, max) over at most ``max_points`` equal-count buckets; NaNs dropped. Short series come
    back as they are (min = max = mean)."""
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(y) <= max_points:
        return x, y, y, y
    edges = np.linspace(0, len(y), max_points + 1).astype(np.int64)
    starts = edges[:-1]
    counts = np.diff(edges)
    mean = np.add.reduceat(y, starts) / counts
    lo = np.minimum.reduceat(y, starts)
    hi = np.maximum.reduceat(y, starts)
    xm = np.add.reduceat(x.astype(np.float64), starts) / counts
    return xm, mean, lo, hi
