"""Shared harness for the comparison benches: interleaved repeats, medians with min-max spreads, one JSON line.

A compared pair (or more) runs interleaved, A B A B ..., after a warm-up round that is not recorded, so a slow
spell of a shared machine hits every variant alike; each repeat gives one figure per variant (a throughput:
higher is better). Per variant we report the median and min-max over repeats; per pair the ratio of the medians
and the min-max of the per-repeat ratios (repeat i of A over repeat i of B: the pairs ran back to back).

Convention for every bench: ``ratio`` = A's throughput / B's throughput, so > 1 means A (ours, grouped, the
mix-aware split) is faster, and a goal is a lower bound on it.

The last line a bench prints is one JSON object (``emit``): the headline setting's record, and with several
settings all of them under ``settings``. ``bench/run_all.sh`` reads that line.

    results = interleave({"ours": run_ours, "hf": run_hf}, repeats=3, warmup=1)
    rec = record("decoder_vs_hf", {"threads": 2}, results, "ours", "hf", "tok_per_s", goal=1.0)
    print(table(results, ["tok_per_s", "step_ms"]))
    emit([rec])
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Iterable

Figures = dict  # one repeat's figures of one variant, e.g. {"seq_per_s": 12.3, "samples_per_s": 30.1}


def add_args(ap: argparse.ArgumentParser, repeats: int = 3, warmup: int = 1) -> None:
    ap.add_argument("--repeats", type=int, default=repeats, help=f"interleaved timed repeats (default {repeats})")
    ap.add_argument("--warmup", type=int, default=warmup, help=f"untimed rounds first (default {warmup})")


def summarize(values: Iterable[float]) -> dict:
    """Median and min-max of a list of figures."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values to summarize")
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def compare(a: list[float], b: list[float]) -> dict:
    """Ratio of the medians of A and B and the min-max of the per-repeat ratios a[i] / b[i]."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need paired repeats, got {len(a)} and {len(b)}")
    if min(b) <= 0 or statistics.median(b) <= 0:
        raise ValueError("B's figures must be positive")
    per = [x / y for x, y in zip(a, b)]
    return {"ratio": statistics.median(a) / statistics.median(b), "ratio_min": min(per), "ratio_max": max(per),
            "ratios": per}


def interleave(variants: dict[str, Callable[[], Figures | float]], repeats: int = 3, warmup: int = 1,
               log: Callable[[str], None] | None = None) -> dict[str, list[Figures]]:
    """Run every variant ``warmup`` times (discarded), then ``repeats`` rounds of A B ... in a fixed order.
    A variant returns its figures as a dict (a bare number becomes {"value": x})."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for w in range(warmup):
        for name, fn in variants.items():
            fn()
            if log:
                log(f"  warm-up {w + 1}/{warmup}: {name}")
    out: dict[str, list[Figures]] = {name: [] for name in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            got = fn()
            figs = got if isinstance(got, dict) else {"value": float(got)}
            out[name].append(figs)
            if log:
                log(f"  repeat {r + 1}/{repeats}: {name} " + ", ".join(
                    f"{k} {v:.4g}" for k, v in figs.items() if isinstance(v, (int, float))))
    return out


def column(results: dict[str, list[Figures]], variant: str, key: str) -> list[float]:
    return [float(f[key]) for f in results[variant]]


def table(results: dict[str, list[Figures]], keys: list[str]) -> str:
    """A readable table: one row per variant, per figure its median (min-max) over repeats."""
    head = f"{'variant':<18}" + "".join(f"{k + ' median (min-max)':>34}" for k in keys)
    lines = [head]
    for name in results:
        cells = []
        for k in keys:
            s = summarize(column(results, name, k))
            cells.append(f"{_num(s['median']):>12} ({_num(s['min'])}-{_num(s['max'])})".rjust(34))
        lines.append(f"{name:<18}" + "".join(cells))
    return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"


def record(bench: str, setting: dict, results: dict[str, list[Figures]], a: str, b: str, key: str,
           goal: float | None = None, **extra) -> dict:
    """The JSON record of one setting: A vs B on figure ``key`` (higher is better), plus both medians."""
    av, bv = column(results, a, key), column(results, b, key)
    c = compare(av, bv)
    rec = {"bench": bench, **setting, "metric": key, "a": a, "b": b,
           "ratio": round(c["ratio"], 4), "ratio_min": round(c["ratio_min"], 4),
           "ratio_max": round(c["ratio_max"], 4), "repeats": len(av)}
    for name, vals in ((a, av), (b, bv)):
        s = summarize(vals)
        for k in ("median", "min", "max"):
            rec[f"{name}_{k}"] = round(s[k], 6)
    if goal is not None:
        rec["goal"] = goal
        rec["goal_met"] = c["ratio"] >= goal
    rec.update(extra)
    return rec


def ratio_line(rec: dict) -> str:
    goal = f"  goal >= {rec['goal']} ({'met' if rec['goal_met'] else 'NOT met'})" if "goal" in rec else ""
    return (f"{rec['a']} / {rec['b']} {rec['metric']}: {rec['ratio']:.3f} (per-repeat {rec['ratio_min']:.3f}-"
            f"{rec['ratio_max']:.3f}, {rec['repeats']} repeats){goal}")


def final_record(records: list[dict], headline: int = -1) -> dict:
    """The last line's object: the headline record, with every setting's record under ``settings``."""
    if not records:
        raise ValueError("no records")
    top = dict(records[headline])
    if len(records) > 1:
        top["settings"] = records
    return top


def emit(records: list[dict], headline: int = -1, file=None) -> None:
    """Print the final JSON line (nothing may be printed after it)."""
    file = file or sys.stdout
    print(json.dumps(final_record(records, headline)), file=file, flush=True)
