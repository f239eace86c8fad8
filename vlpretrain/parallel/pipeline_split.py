"""Vision-aware pipeline splitter: how many decoder layers each virtual pipeline stage gets (the costs come
from ``pipeline_cost.py``).

The model is a chain of parts ``embed`` (vision towers + adaptor + text embedding), ``layers.0..N-1``,
``head``. A layout has ``pp`` ranks x ``vpp`` virtual stages = V virtual stages; virtual stage 0 starts with
``embed``, stage V-1 ends with ``head``, and a split is the list of decoder-layer counts per virtual stage
(sum = n_layers; a 0 only where the stage still holds embed or head, so no stage is empty). Which rank runs
which virtual stage is the schedule table's placement (``layout_rules.py``): r, r+pp, ... (looped) or r and
2pp-1-r (V-shaped: ``zbv``, ``dualpipev``), the same table the runtime places stages by.

Megatron and torchtitan split the decoder layers evenly (``uniform_split``) and ignore the first stage's
vision encoders and the output head; ``partition`` balances the real per-part costs from ``part_costs``, and
``partition_mix`` (what ``layer_split: auto`` runs) minimises the EXPECTED step time over the run's step types
(``step_mix.StepType``: text-only steps, multimodal steps with their images per microbatch): each type's step time
is ``predict``'s formula, weighted by the type's share of the steps.

``partition`` and ``partition_mix`` are exact for vpp == 1 (dynamic programming) and branch and bound for
vpp > 1 (see their docstrings); ``pipeline_cost.predict`` documents the in-flight microbatch counts and the
step-time formula per schedule.
"""
from __future__ import annotations

import math

from vlpretrain.config import ConfigError
from vlpretrain.layout_rules import placement_rank, schedule_info, split_problem

PARTITION_MAX_NODES = 1_000_000  # branch-and-bound nodes per search for vpp > 1 (~1 s); ``exact`` says if enough
_TOL = 1e-9


# ---------------------------------------------------------------------------------------------------------------
# Layout helpers


def part_names(n_layers: int) -> list[str]:
    return ["embed", *(f"layers.{i}" for i in range(n_layers)), "head"]


def stage_style(schedule: str) -> str:
    """How ``schedule`` places virtual stages on ranks: "single", "loop" or "v" (the schedule table's)."""
    return schedule_info(schedule).placement


def stage_bounds(split: list[int]) -> list[tuple[int, int]]:
    """Part-index range [start, end) of each virtual stage (part 0 = embed, 1..N = layers, N+1 = head)."""
    n_layers, v = sum(split), len(split)
    out, start = [], 0
    layer = 0
    for k, c in enumerate(split):
        layer += c
        end = n_layers + 2 if k == v - 1 else 1 + layer
        out.append((start, end))
        start = end
    return out


def validate_split(split: list[int], n_layers: int, n_stages: int) -> None:
    """Raise ConfigError unless ``split`` is a valid layout (see the module docstring)."""
    bad = split_problem(list(split), n_layers, n_stages)
    if bad is not None:
        raise ConfigError(f"config error: parallel.layer_split: {bad}")


# ---------------------------------------------------------------------------------------------------------------
# Splits


def uniform_split(n_layers: int, n_stages: int) -> list[int]:
    """Megatron / torchtitan style: layers spread evenly, earlier stages take the remainder; embed and head
    are not counted."""
    if n_stages <= 0:
        raise ValueError(f"n_stages must be positive, got {n_stages}")
    base, rem = divmod(n_layers, n_stages)
    return [base + (1 if k < rem else 0) for k in range(n_stages)]


def prefix_sums(costs: list[float]) -> list[float]:
    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + c)
    return pre


def counts_from_cuts(cuts: list[int], n_parts: int) -> list[int]:
    """Stage boundaries b_1..b_{V-1} (part indices) -> layer counts per stage."""
    b = [0, *cuts, n_parts]
    v = len(b) - 1
    return [(b[k + 1] - b[k]) - (k == 0) - (k == v - 1) for k in range(v)]


def cuts_from_counts(split: list[int]) -> list[int]:
    return [end for _, end in stage_bounds(split)[:-1]]


def _rank_loads(pre: list[float], cuts: list[int], pp: int, style: str) -> list[float]:
    b = [0, *cuts, len(pre) - 1]
    loads = [0.0] * pp
    for k in range(len(b) - 1):
        loads[placement_rank(k, pp, style)] += pre[b[k + 1]] - pre[b[k]]
    return loads


def _minimax_stage_dp(pre: list[float], v: int) -> float:
    """Exact min over contiguous splits of P parts into v non-empty stages of the largest stage cost."""
    p = len(pre) - 1
    inf = math.inf
    best = [inf] * (p + 1)  # best[j]: first j parts in k stages
    for j in range(1, p + 1):
        best[j] = pre[j]
    for k in range(2, v + 1):
        new = [inf] * (p + 1)
        for j in range(k, p + 1):
            m = inf
            for i in range(k - 1, j):
                val = max(best[i], pre[j] - pre[i])
                if val < m:
                    m = val
            new[j] = m
        best = new
    return best[p]


def _front_light_under(pre: list[float], v: int, bound: float) -> list[int] | None:
    """Lexicographically smallest layer counts (fewest layers on the earliest stages) with every stage <= bound.
    Exact: a suffix-feasibility table, then a greedy pass."""
    p = len(pre) - 1
    # feas[k][i]: parts [i, p) split into k non-empty stages, each <= bound
    feas = [[False] * (p + 1) for _ in range(v + 1)]
    feas[0][p] = True
    for k in range(1, v + 1):
        for i in range(p - 1, -1, -1):
            for j in range(i + 1, p + 1):
                if pre[j] - pre[i] > bound:
                    break
                if feas[k - 1][j]:
                    feas[k][i] = True
                    break
    if not feas[v][0]:
        return None
    cuts, i = [], 0
    for s in range(v - 1):
        for j in range(i + 1, p + 1):
            if pre[j] - pre[i] <= bound and feas[v - 1 - s][j]:
                cuts.append(j)
                i = j
                break
    return cuts


class _Budget(Exception):
    """The search passed its node budget; args[0] is the best split found so far (or None)."""


def _search(pre: list[float], v: int, pp: int, style: str, rank_bound: float, stage_bound: float, mode: str,
            max_nodes: int) -> list[int] | None:
    """Branch and bound over stage boundaries (depth first, lexicographic order) with every rank load <=
    ``rank_bound`` and every stage <= ``stage_bound``, minimising the max rank load (mode "rank") or the max
    stage cost (mode "stage"); only strict improvements on the bound count, None if there is none. Prunes: a
    stage that breaks a bound (costs >= 0, so longer stages do too), remaining cost above what the remaining
    stages and ranks can take. Raises _Budget past ``max_nodes`` nodes."""
    p = len(pre) - 1
    ranks = [placement_rank(k, pp, style) for k in range(v)]
    later = [sorted(set(ranks[k + 1:])) for k in range(v)]  # ranks that still receive a stage after stage k
    lim = {"rank": rank_bound, "stage": stage_bound}
    best: list[int] | None = None
    nodes = 0
    loads = [0.0] * pp
    cuts: list[int] = []

    def leaf(val_rank: float, val_stage: float) -> None:
        nonlocal best
        best = list(cuts)
        val = val_rank if mode == "rank" else val_stage
        lim[mode] = val * (1 - _TOL) - 1e-300  # only strict improvements from now on

    def dfs(k: int, i: int, max_stage: float) -> None:
        nonlocal nodes
        nodes += 1
        if nodes > max_nodes:
            raise _Budget(best)
        r = ranks[k]
        if k == v - 1:
            c = pre[p] - pre[i]
            if c <= lim["stage"] and loads[r] + c <= lim["rank"]:
                leaf(max(max(loads), loads[r] + c), max(max_stage, c))
            return
        for j in range(i + 1, p - (v - 1 - k) + 1):
            c = pre[j] - pre[i]
            if c > lim["stage"] or loads[r] + c > lim["rank"]:
                break  # costs are >= 0: a later j only adds
            rest = pre[p] - pre[j]
            if rest > (v - 1 - k) * lim["stage"] * (1 + _TOL):
                continue
            loads[r] += c
            if rest <= sum(max(0.0, lim["rank"] - loads[q]) for q in later[k]) * (1 + _TOL):
                cuts.append(j)
                dfs(k + 1, j, max(max_stage, c))
                cuts.pop()
            loads[r] -= c

    dfs(0, 0, 0.0)
    return best


def _loosen(x: float) -> float:
    return x * (1 + _TOL) + 1e-300


def _stage_costs(pre: list[float], cuts: list[int]) -> list[float]:
    b = [0, *cuts, len(pre) - 1]
    return [pre[b[k + 1]] - pre[b[k]] for k in range(len(b) - 1)]


def _rank_lower_bound(costs: list[float], v: int, pp: int, style: str) -> float:
    """No split beats this: the mean rank load, and per rank its stages' least possible content (embed for
    stage 0, head for the last, one cheapest layer for each other stage)."""
    layers = costs[1:-1]
    cheapest = min(layers) if layers else 0.0
    need = [0.0] * pp
    for k in range(v):
        if v == 1:
            c = sum(costs)
        else:
            c = costs[0] if k == 0 else (costs[-1] if k == v - 1 else cheapest)
        need[placement_rank(k, pp, style)] += c
    return max(sum(costs) / pp, max(need))


def _polish(pre: list[float], cuts: list[int], pp: int, style: str, rank_cap: float,
            stage_cap: float) -> list[int]:
    """Single-boundary moves that keep every rank <= rank_cap and every stage <= stage_cap while the sorted
    (descending) rank loads, then stage costs, improve: evens out the ranks and chunks the optimum leaves free."""
    p = len(pre) - 1

    def key(c):
        return (sorted(_rank_loads(pre, c, pp, style), reverse=True), sorted(_stage_costs(pre, c), reverse=True))

    cur, cur_key = list(cuts), key(cuts)
    while True:
        best, best_key = None, cur_key
        for idx in range(len(cur)):
            lo = cur[idx - 1] + 1 if idx > 0 else 1
            hi = cur[idx + 1] - 1 if idx + 1 < len(cur) else p - 1
            for d in (-1, 1):
                nb = cur[idx] + d
                if not lo <= nb <= hi:
                    continue
                cand = cur[:idx] + [nb] + cur[idx + 1:]
                k = key(cand)
                if k < best_key and k[0][0] <= rank_cap and k[1][0] <= stage_cap:
                    best, best_key = cand, k
        if best is None:
            return cur
        cur, cur_key = best, best_key


def partition_details(costs: list[float], n_stages: int, pp: int, style: str = "loop",
                      max_nodes: int = PARTITION_MAX_NODES) -> dict:
    """``partition`` plus ``value`` (the slowest rank's time), ``max_stage`` (the slowest virtual stage) and
    ``exact`` (whether ``value`` is proven optimal)."""
    if n_stages % pp:
        raise ValueError(f"n_stages={n_stages} is not a multiple of pp={pp}")
    if len(costs) < 2:
        raise ValueError("costs must hold at least embed and head")
    if any(c < 0 or not math.isfinite(c) for c in costs):
        raise ValueError(f"costs must be finite and >= 0, got {costs}")
    n_parts = len(costs)
    if n_stages > n_parts:
        raise ValueError(f"{n_stages} virtual stages exceed the {n_parts} parts")
    pre = prefix_sums(costs)
    v = n_stages
    exact = True
    if v == pp:  # one stage per rank: the rank objective is the stage objective, exact DP
        opt = _minimax_stage_dp(pre, v)
        cuts = _front_light_under(pre, v, _loosen(opt))
        assert cuts is not None
    else:
        # vpp > 1. 1) min max rank load: seeds (the stage-minimax DP split, the uniform one) polished by
        # single-boundary moves, then branch and bound unless the best seed meets the lower bound. 2) at that
        # rank optimum, branch and bound on the slowest virtual stage (it sets the interleaved bubble).
        # 3) ties: polish towards even ranks and chunks.
        seeds = [_front_light_under(pre, v, _loosen(_minimax_stage_dp(pre, v)))]
        try:
            u = uniform_split(n_parts - 2, v)
            validate_split(u, n_parts - 2, v)
            seeds.append(cuts_from_counts(u))
        except ConfigError:
            pass
        seeds = [_polish(pre, c, pp, style, math.inf, math.inf) for c in seeds if c is not None]
        cuts = min(seeds, key=lambda c: max(_rank_loads(pre, c, pp, style)))
        inf = math.inf
        if max(_rank_loads(pre, cuts, pp, style)) > _loosen(_rank_lower_bound(costs, v, pp, style)):
            try:
                cuts = _search(pre, v, pp, style, max(_rank_loads(pre, cuts, pp, style)) * (1 - _TOL), inf,
                               "rank", max_nodes) or cuts
            except _Budget as e:
                exact = False
                cuts = e.args[0] or cuts
        rank_opt = _loosen(max(_rank_loads(pre, cuts, pp, style)))
        stage_lb = max(max(costs), sum(costs) / v)
        if max(_stage_costs(pre, cuts)) > _loosen(stage_lb):
            try:
                cuts = _search(pre, v, pp, style, rank_opt, max(_stage_costs(pre, cuts)) * (1 - _TOL), "stage",
                               max_nodes) or cuts
            except _Budget as e:
                cuts = e.args[0] or cuts
        stage_opt = _loosen(max(_stage_costs(pre, cuts)))
        cands = [cuts] + [c for c in seeds if max(_rank_loads(pre, c, pp, style)) <= rank_opt
                          and max(_stage_costs(pre, c)) <= stage_opt]
        cands = [_polish(pre, c, pp, style, rank_opt, stage_opt) for c in cands]
        cuts = min(cands, key=lambda c: (sorted(_rank_loads(pre, c, pp, style), reverse=True),
                                         sorted(_stage_costs(pre, c), reverse=True)))
    return {"split": counts_from_cuts(cuts, n_parts), "value": max(_rank_loads(pre, cuts, pp, style)),
            "max_stage": max(_stage_costs(pre, cuts)), "exact": exact}


def partition(costs: list[float], n_stages: int, pp: int, style: str = "loop") -> list[int]:
    """Decoder-layer counts per virtual stage minimising the slowest pipeline rank's time.

    ``costs``: per-part times [embed, layers..., head]; rank time = sum of its virtual stages' costs (``style``
    "loop": rank r holds stages r, r+pp, ...; "v": DualPipeV's r, 2pp-1-r).
    vpp == 1: exact, dynamic programming over contiguous splits (O(V P^2)).
    vpp > 1: the stage-minimax DP split, polished by single-boundary moves under the rank objective, seeds a
    branch and bound over all contiguous splits; at the optimal rank time a second branch and bound minimises
    the slowest virtual stage (which sets the interleaved bubble). Exact when both finish within
    ``PARTITION_MAX_NODES`` nodes (``partition_details`` reports it; every shipped layout does).
    Ties: vpp == 1 takes the split with the fewest layers on the earliest stages, which hold the most
    in-flight microbatches under 1F1B; vpp > 1 evens out the other ranks and chunks (single-boundary moves).
    """
    return partition_details(costs, n_stages, pp, style)["split"]
