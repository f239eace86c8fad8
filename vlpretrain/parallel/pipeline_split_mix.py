"""Layer splits balanced over the run's step mix: ``layer_split: auto``.

A run sees several step types (``step_mix.StepType``): with modality grouping, text-only steps (no vision work in
the first stage) and multimodal ones; their per-part costs differ only in ``embed``. The expected step time of
a split is the share-weighted sum of each type's ``predict`` step time,

    E[T] = sum_t w_t (n_mb x max_r L_t[r] + f (pp - 1) max_k S_t[k]),

(L_t[r]: rank r's time per microbatch, S_t[k]: virtual stage k's, f: the schedule's bubble factor). This is
not n_mb x max_r E[L[r]]: the slowest rank of a text step is not the slowest of a multimodal one, and the
partitioner minimises E[T] itself:

* one virtual stage per rank (vpp = 1): E[T] = (n_mb + f (pp - 1)) sum_t w_t max_k S_t[k]. Exact dynamic
  programming over (stages, end part) keeping, per state, the Pareto front of per-type maxima (a prefix whose
  maxima are all <= another's, with cuts that are not later, can never lose to it); with one type it is the
  min-max DP. Ties: fewest layers on the earliest stages (they hold the most in-flight microbatches).
* vpp > 1 (looped or V placement): branch and bound over stage boundaries, seeded by the min-max split of
  each type and of the mean costs (polished by single-boundary moves); bound per type: the current slowest
  rank or the remaining work spread evenly over the ranks still to receive stages, and likewise per stage.
  Exact when it finishes within ``MAX_NODES`` nodes (``exact`` in the result).

Measured part times (``plan --measure``) are for one image count; other step types scale the measured
``embed`` by the cost model's ratio of their first-stage FLOPs.
"""
from __future__ import annotations

import dataclasses
import math

from vlpretrain.config import Config, ConfigError
from vlpretrain.data.step_mix import StepType, assumed_mix
from vlpretrain.layout_rules import placement_rank, schedule_info
from vlpretrain.parallel.pipeline_cost import PartCost, part_costs
from vlpretrain.parallel.pipeline_split import (
    counts_from_cuts,
    cuts_from_counts,
    partition,
    prefix_sums,
    stage_bounds,
    uniform_split,
    validate_split,
)

MAX_NODES = 100_000  # branch-and-bound nodes for vpp > 1 (about a second in Python)
_TOL = 1e-12


def mix_costs(cfg: Config, mix: list[StepType], measured: dict[str, float] | None = None,
              measured_images_per_sample: float = 1.0) -> list[list[PartCost]]:
    """Per-part costs of each step type (``part_costs`` at the type's images per microbatch)."""
    out = []
    ref = part_costs(cfg, images_per_sample=measured_images_per_sample) if measured is not None else None
    for st in mix:
        costs = part_costs(cfg, image_counts=st.images or (0,))
        if measured is not None:
            scale = costs[0].time_s / ref[0].time_s if ref[0].time_s > 0 else 1.0
            costs = [dataclasses.replace(c, time_s=measured[c.name] * (scale if i == 0 else 1.0), measured=True)
                     for i, c in enumerate(costs)]
        out.append(costs)
    return out


def expected_step_time(split: list[int], type_times: list[list[float]], shares: list[float], pp: int,
                       schedule: str, n_microbatches: int) -> float:
    """E[T] of ``split`` (module docstring); ``type_times[t]`` per-part times of type t."""
    info = schedule_info(schedule)
    total = 0.0
    for w, times in zip(shares, type_times):
        vtime = [sum(times[a:e]) for a, e in stage_bounds(split)]
        rtime = [0.0] * pp
        for k, t in enumerate(vtime):
            rtime[placement_rank(k, pp, info.placement)] += t
        total += w * (n_microbatches * max(rtime) + info.bubble * (pp - 1) * max(vtime))
    return total


def _pareto_dp(pres: list[list[float]], w: list[float], v: int) -> list[int]:
    """Cuts minimising sum_t w_t max_k S_t[k] over contiguous splits into v non-empty stages (exact)."""
    p = len(pres[0]) - 1

    def seg(i: int, j: int) -> tuple[float, ...]:
        return tuple(pre[j] - pre[i] for pre in pres)

    fronts: dict[int, list[tuple[tuple[float, ...], tuple[int, ...]]]] = {
        j: [(seg(0, j), ())] for j in range(1, p - (v - 1) + 1)}
    for k in range(2, v + 1):
        cands: dict[int, list] = {}
        last = p if k == v else p - (v - k)
        for i, front in fronts.items():
            for j in ([p] if k == v else range(i + 1, last + 1)):
                s = seg(i, j)
                for vec, cuts in front:
                    cands.setdefault(j, []).append((tuple(max(a, b) for a, b in zip(vec, s)), cuts + (i,)))
        fronts = {}
        for j, items in cands.items():
            items.sort(key=lambda x: x[1])  # earlier cuts first: they win ties
            kept: list = []
            for vec, cuts in items:
                if not any(all(a <= b + _TOL * max(1.0, abs(b)) for a, b in zip(kv, vec)) for kv, _ in kept):
                    kept.append((vec, cuts))
            fronts[j] = kept
    best = min(fronts[p], key=lambda x: (round(sum(wt * a for wt, a in zip(w, x[0])), 12), x[1]))
    return list(best[1])


class _Budget(Exception):
    pass


def _branch_and_bound(pres: list[list[float]], w: list[float], v: int, pp: int, placement: str, n_mb: int,
                      bubble: float, incumbent: list[int], max_nodes: int) -> tuple[list[int], bool]:
    """Minimise E[T] over all contiguous splits (vpp > 1) from an incumbent; (cuts, finished within budget)."""
    n_types, p = len(pres), len(pres[0]) - 1
    ranks = [placement_rank(k, pp, placement) for k in range(v)]
    ahead = [sorted(set(ranks[k:])) for k in range(v)]  # ranks still to receive a stage from stage k on
    fill = bubble * (pp - 1)

    def value(cuts: list[int]) -> float:
        b = [0, *cuts, p]
        tot = 0.0
        for t in range(n_types):
            loads, smax = [0.0] * pp, 0.0
            for k in range(v):
                c = pres[t][b[k + 1]] - pres[t][b[k]]
                loads[ranks[k]] += c
                smax = max(smax, c)
            tot += w[t] * (n_mb * max(loads) + fill * smax)
        return tot

    best_cuts, best = list(incumbent), value(incumbent)
    loads = [[0.0] * pp for _ in range(n_types)]
    smax = [0.0] * n_types
    cuts: list[int] = []
    nodes = 0

    def bound(k: int, i: int) -> float:
        tot = 0.0
        for t in range(n_types):
            rest = pres[t][p] - pres[t][i]
            lt = loads[t]
            spread = (sum(lt[r] for r in ahead[k]) + rest) / len(ahead[k])
            tot += w[t] * (n_mb * max(max(lt), spread) + fill * max(smax[t], rest / (v - k)))
        return tot

    def dfs(k: int, i: int) -> None:
        nonlocal nodes, best, best_cuts
        nodes += 1
        if nodes > max_nodes:
            raise _Budget
        if bound(k, i) >= best * (1 - 1e-12):
            return
        r = ranks[k]
        if k == v - 1:
            val = value(cuts)
            if val < best * (1 - 1e-12):
                best, best_cuts = val, list(cuts)
            return
        for j in range(i + 1, p - (v - 1 - k) + 1):
            saved = list(smax)
            for t in range(n_types):
                c = pres[t][j] - pres[t][i]
                loads[t][r] += c
                smax[t] = max(smax[t], c)
            cuts.append(j)
            dfs(k + 1, j)
            cuts.pop()
            for t in range(n_types):
                loads[t][r] -= pres[t][j] - pres[t][i]
            smax[:] = saved

    try:
        dfs(0, 0)
        return best_cuts, True
    except _Budget:
        return best_cuts, False


def _polish(value, cuts: list[int], p: int) -> list[int]:
    """Single-boundary moves while the expected step time improves."""
    cur, cur_v = list(cuts), value(cuts)
    improved = True
    while improved:
        improved = False
        for idx in range(len(cur)):
            lo = cur[idx - 1] + 1 if idx else 1
            hi = cur[idx + 1] - 1 if idx + 1 < len(cur) else p - 1
            for d in (-1, 1):
                nb = cur[idx] + d
                if lo <= nb <= hi:
                    cand = cur[:idx] + [nb] + cur[idx + 1:]
                    cv = value(cand)
                    if cv < cur_v * (1 - 1e-12):
                        cur, cur_v, improved = cand, cv, True
    return cur


def partition_mix(type_times: list[list[float]], shares: list[float], n_stages: int, pp: int,
                  schedule: str = "1f1b", n_microbatches: int = 1, max_nodes: int = MAX_NODES) -> dict:
    """Decoder-layer counts per virtual stage minimising the expected step time (module docstring).
    ``type_times[t]``: per-part times [embed, layers..., head] of step type t, ``shares[t]`` its share.
    Returns {"split", "value" (E[T]), "exact"}."""
    if not type_times or len(type_times) != len(shares) or any(x < 0 for x in shares) or sum(shares) <= 0:
        raise ValueError(f"need one share >= 0 per step type (positive in sum), got {shares}")
    n_parts = len(type_times[0])
    if any(len(t) != n_parts for t in type_times) or n_parts < 2:
        raise ValueError("every step type needs a cost per part (embed, layers..., head)")
    if any(c < 0 or not math.isfinite(c) for t in type_times for c in t):
        raise ValueError("costs must be finite and >= 0")
    if n_stages % pp or n_stages > n_parts:
        raise ValueError(f"{n_stages} virtual stages for pp={pp} and {n_parts} parts")
    w = [x / sum(shares) for x in shares]
    info = schedule_info(schedule)
    placement = info.placement if n_stages > pp else "single"
    pres = [prefix_sums(t) for t in type_times]
    n_layers = n_parts - 2
    exact = True
    if n_stages == pp:
        cuts = _pareto_dp(pres, w, n_stages)
    else:
        mean = [sum(wt * t[i] for wt, t in zip(w, type_times)) for i in range(n_parts)]
        seeds = [cuts_from_counts(partition(t, n_stages, pp, placement)) for t in (*type_times, mean)]
        uni = uniform_split(n_layers, n_stages)
        try:
            validate_split(uni, n_layers, n_stages)
            seeds.append(cuts_from_counts(uni))
        except ConfigError:
            pass

        def value(c: list[int]) -> float:
            return expected_step_time(counts_from_cuts(c, n_parts), type_times, w, pp, schedule, n_microbatches)

        seeds = [_polish(value, c, n_parts) for c in seeds]
        incumbent = min(seeds, key=value)
        cuts, exact = _branch_and_bound(pres, w, n_stages, pp, placement, n_microbatches, info.bubble, incumbent,
                                        max_nodes)
    split = counts_from_cuts(cuts, n_parts)
    return {"split": split, "value": expected_step_time(split, type_times, w, pp, schedule, n_microbatches),
            "exact": exact}


def resolve_layer_split(cfg: Config, n_microbatches: int, mix: list[StepType] | None = None,
                        measured: dict[str, float] | None = None, images_per_sample: float = 1.0) -> list[int]:
    """``parallel.layer_split`` -> decoder-layer counts per virtual stage. ``auto``: ``partition_mix`` over
    ``mix`` (default ``step_mix.assumed_mix(cfg, images_per_sample)``)."""
    par, n = cfg.parallel, cfg.model.n_layers
    v = par.pp * par.vpp
    ls = par.layer_split
    if isinstance(ls, list):
        split = list(ls)
    elif ls == "uniform":
        split = uniform_split(n, v)
    elif ls == "auto":
        mix = mix or assumed_mix(cfg, images_per_sample)
        costs = mix_costs(cfg, mix, measured, images_per_sample)
        split = partition_mix([[c.time_s for c in cs] for cs in costs], [st.share for st in mix], v, par.pp,
                              par.schedule, n_microbatches)["split"]
    else:  # pragma: no cover - config validation rejects anything else
        raise ConfigError(f"config error: parallel.layer_split: unknown value {ls!r}")
    validate_split(split, n, v)
    return split
