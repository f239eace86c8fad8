"""Vision-aware pipeline splitter: how many decoder layers each virtual pipeline stage gets.

The model is a chain of parts ``embed`` (vision towers + adaptor + text embedding), ``layers.0..N-1``,
``head``. A layout has ``pp`` ranks x ``vpp`` virtual stages = V virtual stages; virtual stage 0 starts with
``embed``, stage V-1 ends with ``head``, and a split is the list of decoder-layer counts per virtual stage
(sum = n_layers; a 0 only where the stage still holds embed or head, so no stage is empty). Which rank runs
which virtual stage is the schedule table's placement (``layout_rules.py``): r, r+pp, ... (looped) or r and
2pp-1-r (V-shaped: ``zbv``, ``dualpipev``), the same table the runtime places stages by.

Megatron and torchtitan split the decoder layers evenly (``uniform_split``) and ignore the first stage's
vision encoders and the output head; ``partition`` balances the real per-part costs from ``part_costs``, and
``partition_mix`` (what ``layer_split: auto`` runs) minimises the EXPECTED step time over the run's step types
(``mix.StepType``: text-only steps, multimodal steps with their images per microbatch): each type's step time
is ``predict``'s formula, weighted by the type's share of the steps.

Cost model (per MICROBATCH of ``train.micro_batch_size`` sequences of ``train.seq_len`` tokens, on ONE device):

* FLOPs: forward FLOPs from ``vlpretrain.models.flops`` (siglip/sam/adaptor per image, decoder layer and head
  per sequence); forward+backward from ``step_flops`` (the same backward rules as the MFU counter: frozen parts
  upstream of every trainable parameter run no backward, trainable parts pay weight grads, activation grads
  flow through everything downstream of the first trainable part), so the per-part sums equal ``step_flops``.
  With ``parallel.tp`` > 1 decoder layers and head are divided by tp; ``embed``'s vision side is divided by
  the image split (``parallel.vision_split: images``: the busiest TP rank encodes ceil(images / tp) of a
  microbatch, at least the blank one a rank without images runs; the all-gather of the adaptor outputs is
  small next to the towers and not modelled); with ``replicate`` (the paper) every TP rank encodes every
  image. ``activation_checkpointing: full`` adds one forward of every decoder layer that runs a backward.
* Time: flops / (peak TFLOP/s x 1e12 x ``EFFICIENCY``). Peak: ``logging.peak_tflops`` if set, else the visible
  GPU's datasheet peak (``models.peaks.device_peak_tflops``), else (no GPU: planning on a CPU host) the H100
  figure, since the plan is for GPU training and only ratios decide the split. ``EFFICIENCY`` = 0.4 for every
  part: a flat MFU guess; measured times (``measure_part_times`` / ``plan --measure``) replace the model when
  the encoders run at a different efficiency than the decoder.
* Memory (bytes per device): weights in the compute dtype (bf16 unless ``train.dtype: fp32``) for every
  parameter, plus for trainable parameters an fp32 master copy (bf16 only), an fp32 gradient and AdamW's two
  fp32 states; no ZeRO/FSDP sharding over dp is assumed. Activations per in-flight microbatch: decoder layer
  s*b*h*34 bytes (Megatron's sbh(34 + 5as/h) without the 5as/h score term: ``F.scaled_dot_product_attention``
  runs fused flash/memory-efficient kernels that store no S x S scores; with tp: sbh(10 + 24/tp) or, with
  sequence parallel, 34sbh/tp; ``selective`` recomputation keeps the same estimate; ``full`` keeps only the
  bf16 layer input, 2sbh); head: bf16 input + fp32 log-softmax of the logits, b*s*(4h + 4V/tp); a trainable
  vision tower: 34 bytes x tokens x width x depth per image; the adaptor (when it runs a backward): the inputs
  and outputs of its Linear layers in bf16. Parts that run no backward keep no activations.

``partition`` and ``partition_mix`` are exact for vpp == 1 (dynamic programming) and branch and bound for
vpp > 1 (see their docstrings); ``predict`` documents the in-flight microbatch counts and the step-time formula
per schedule.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional

from vlpretrain.config import Config, ConfigError, ModelConfig, trainable_parts
from vlpretrain.models.flops import (adaptor_flops, decoder_layer_flops, head_flops, sam_flops, siglip_flops,
                                     step_flops)
from vlpretrain.layout_rules import placement_rank, schedule_info, split_problem

EFFICIENCY = 0.4  # fraction of peak FLOP/s the time model assumes for every part (MFU guess)
NO_GPU_PEAK_TFLOPS = 989.0  # H100 dense bf16: the assumed target when planning on a host without a GPU
LAYER_ACT_BYTES = 34  # Megatron: bytes per (token x hidden) of one transformer layer in 16-bit, no TP
VIT_ACT_BYTES = 34  # same estimate for a trainable ViT block (per token x width)
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


def _front_light_under(pre: list[float], v: int, bound: float) -> Optional[list[int]]:
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
            max_nodes: int) -> Optional[list[int]]:
    """Branch and bound over stage boundaries (depth first, lexicographic order) with every rank load <=
    ``rank_bound`` and every stage <= ``stage_bound``, minimising the max rank load (mode "rank") or the max
    stage cost (mode "stage"); only strict improvements on the bound count, None if there is none. Prunes: a
    stage that breaks a bound (costs >= 0, so longer stages do too), remaining cost above what the remaining
    stages and ranks can take. Raises _Budget past ``max_nodes`` nodes."""
    p = len(pre) - 1
    ranks = [placement_rank(k, pp, style) for k in range(v)]
    later = [sorted(set(ranks[k + 1:])) for k in range(v)]  # ranks that still receive a stage after stage k
    lim = {"rank": rank_bound, "stage": stage_bound}
    best: Optional[list[int]] = None
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


# ---------------------------------------------------------------------------------------------------------------
# Cost model


@dataclass
class PartCost:
    name: str
    time_s: float  # forward + backward (+ recompute) seconds per microbatch
    memory_bytes: float  # static_bytes + activation_bytes (one microbatch in flight)
    flops: float  # forward + backward (+ recompute) FLOPs per microbatch on one device
    forward_flops: float = 0.0
    static_bytes: float = 0.0  # weights, master weights, grads, optimizer states
    activation_bytes: float = 0.0  # per in-flight microbatch
    params: int = 0
    trainable_params: int = 0
    measured: bool = False


_PARAM_CACHE: dict[str, tuple[dict[str, dict[str, int]], int]] = {}


def _part_params(m: ModelConfig) -> tuple[dict[str, dict[str, int]], int]:
    """(counts per pipeline part and paper part, sum of in+out features of the adaptor's Linears), from the
    model built on the meta device; cached per model config."""
    key = json.dumps(dataclasses.asdict(m), sort_keys=True)
    if key not in _PARAM_CACHE:
        from torch import nn

        from vlpretrain.models.vlm import build_model, part_of

        model = build_model(m, "meta")
        counts: dict[str, dict[str, int]] = {}
        for name, p in model.named_parameters():
            if name.startswith("embed."):
                part = "embed"
            elif name.startswith("layers."):
                part = "layers." + name.split(".")[1]
            elif name.startswith("head."):
                part = "head"
            else:  # pragma: no cover - a parameter outside the three part kinds
                raise ValueError(f"parameter {name} belongs to no pipeline part")
            group = counts.setdefault(part, {})
            group[part_of(name)] = group.get(part_of(name), 0) + p.numel()
        widths = sum(mod.in_features + mod.out_features for mod in model.embed.adaptor.modules()
                     if isinstance(mod, nn.Linear))
        if len(_PARAM_CACHE) > 8:
            _PARAM_CACHE.clear()
        _PARAM_CACHE[key] = (counts, widths)
    return _PARAM_CACHE[key]


def part_parameters(m: ModelConfig) -> dict[str, dict[str, int]]:
    """Parameter counts per pipeline part and paper part (siglip/sam/adaptor/llm), from the meta-device model."""
    return {k: dict(v) for k, v in _part_params(m)[0].items()}


def peak_tflops(cfg: Config) -> float:
    """The peak the time model scales: logging.peak_tflops, else the visible GPU's, else H100 (see module doc)."""
    if cfg.logging.peak_tflops > 0:
        return cfg.logging.peak_tflops
    import torch

    if torch.cuda.is_available():
        from vlpretrain.hardware import device_peak_tflops

        return device_peak_tflops(cfg, torch.device("cuda"))
    return NO_GPU_PEAK_TFLOPS


def encoded_images(cfg: Config, images: float) -> float:
    """Images the busiest first-stage TP rank encodes for a microbatch holding ``images`` (module docstring):
    all of them (``vision_split: replicate`` or tp 1), else ceil(images / tp) and at least the blank image a
    rank without one runs; a fractional count (an average) is divided evenly."""
    tp = cfg.parallel.tp
    if images <= 0 or tp == 1 or cfg.parallel.vision_split != "images":
        return float(max(images, 0.0))
    if float(images).is_integer():
        return float(max(1, math.ceil(images / tp)))
    return max(1.0, images / tp)


def part_costs(cfg: Config, device_tflops: float | None = None, measured: dict[str, float] | None = None,
               images_per_sample: float = 1.0, efficiency: float = EFFICIENCY,
               image_counts: tuple[float, ...] | None = None) -> list[PartCost]:
    """Per-microbatch time, memory and FLOPs of each part, in order [embed, layers.0, ..., head].

    ``device_tflops``: peak TFLOP/s (default ``peak_tflops(cfg)``); time = flops / (peak x 1e12 x efficiency).
    ``measured``: part name -> measured forward+backward seconds; replaces the time model (all parts needed).
    Images: ``image_counts`` (images per microbatch, one entry per microbatch observed: a step type's) or
    ``images_per_sample`` x micro batch; ``encoded_images`` gives what the busiest TP rank encodes of them.
    Per-part FLOPs are one device's (tp and the image split applied).
    """
    m, t, par = cfg.model, cfg.train, cfg.parallel
    if images_per_sample < 0 or (image_counts is not None and any(n < 0 for n in image_counts)):
        raise ValueError(f"images per sample / microbatch must be >= 0, got {images_per_sample}, {image_counts}")
    trainable = trainable_parts(cfg)
    b, s, tp = t.micro_batch_size, t.seq_len, par.tp
    names = part_names(m.n_layers)
    if measured is not None:
        missing = [n for n in names if n not in measured]
        unknown = sorted(set(measured) - set(names))
        if missing or unknown:
            raise ValueError(f"measured times: missing parts {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unknown {unknown[:3]}")
    peak = device_tflops if device_tflops is not None else peak_tflops(cfg)
    rate = peak * 1e12 * efficiency

    # FLOPs: forward from the per-part formulas, forward+backward via step_flops' backward rules
    if image_counts is not None:
        images = sum(encoded_images(cfg, n) for n in image_counts) / max(len(image_counts), 1)
    else:
        images = encoded_images(cfg, b * images_per_sample)
    emb_fwd = images * (siglip_flops(m) + sam_flops(m) + adaptor_flops(m))
    emb_step = step_flops(m, 0, s, images, trainable)  # sequences=0: the vision side + adaptor only
    emb_tot = emb_fwd * emb_step.total / emb_step.forward if emb_step.forward > 0 else 0.0
    llm = step_flops(m, b, s, 0, trainable)  # images=0: decoder + head only
    llm_ratio = llm.total / llm.forward  # 1, 2 or 3
    layer_fwd = b * decoder_layer_flops(m, s) / tp
    head_fwd = b * head_flops(m, s) / tp
    recompute = layer_fwd if (par.activation_checkpointing == "full" and llm_ratio > 1) else 0.0

    # memory
    bf16 = t.dtype != "fp32"
    w_bytes = 2 if bf16 else 4
    train_bytes = w_bytes + (4 if bf16 else 0) + 4 + 8  # (+master) + grad + AdamW m, v
    params, adaptor_widths = _part_params(m)

    def static(name: str, shard: int) -> tuple[float, int, int]:
        grp = params.get(name, {})
        total = sum(grp.values())
        tr = sum(n for part, n in grp.items() if part in trainable)
        return ((total - tr) * w_bytes + tr * train_bytes) / shard, total, tr

    sbh = b * s * m.dim
    if llm_ratio == 1:  # no backward through the decoder: nothing kept
        layer_act = head_act = 0.0
    else:
        if par.activation_checkpointing == "full":
            layer_act = 2.0 * sbh / (tp if par.sequence_parallel else 1)
        elif tp == 1 or par.sequence_parallel:
            layer_act = LAYER_ACT_BYTES * sbh / tp
        else:
            layer_act = sbh * (10 + 24 / tp)
        head_act = b * s * (4 * m.dim + 4 * m.vocab_size / tp)
    emb_act = 0.0
    if emb_tot > emb_fwd:  # something in embed runs a backward
        per_image = 0.0
        if "siglip" in trainable:
            g = m.siglip.image_size // m.siglip.patch_size
            per_image += VIT_ACT_BYTES * g * g * m.siglip.width * m.siglip.depth
        if "sam" in trainable and m.sam.enabled:
            g = m.sam.image_size // m.sam.patch_size
            per_image += VIT_ACT_BYTES * g * g * m.sam.width * m.sam.depth
        per_image += 2 * m.image_tokens * adaptor_widths
        emb_act = images * per_image

    out: list[PartCost] = []
    for name in names:
        if name == "embed":
            fwd, tot, act = emb_fwd, emb_tot, emb_act
            st, n, tr = static(name, 1)  # weights not tensor-parallel: replicated on every TP rank
        elif name == "head":
            fwd, tot, act = head_fwd, head_fwd * llm_ratio, head_act
            st, n, tr = static(name, tp)
        else:
            fwd, tot, act = layer_fwd, layer_fwd * llm_ratio + recompute, layer_act
            st, n, tr = static(name, tp)
        time_s = measured[name] if measured is not None else tot / rate
        out.append(PartCost(name=name, time_s=time_s, memory_bytes=st + act, flops=tot, forward_flops=fwd,
                            static_bytes=st, activation_bytes=act, params=n, trainable_params=tr,
                            measured=measured is not None))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Prediction


def step_time(vtime: list[float], pp: int, placement: str, n_mb: int, bubble: float) -> float:
    """``predict``'s step time from the virtual stages' times: n_mb x the slowest rank + bubble x (pp - 1) x the
    slowest virtual stage."""
    rtime = [0.0] * pp
    for k, t in enumerate(vtime):
        rtime[placement_rank(k, pp, placement)] += t
    return n_mb * max(rtime) + bubble * (pp - 1) * max(vtime)


def predict(cfg: Config, split: list[int], costs: list[PartCost], n_microbatches: int, dp: int = 1) -> dict:
    """Per-rank time and memory and the step time of ``split`` under ``parallel.schedule``, for one step type
    (``costs``) and ``n_microbatches`` per pipeline (``mesh.Layout.n_microbatches``; ``dp`` is reported).

    ``stage_time[r]``: forward+backward seconds of one microbatch on rank r (sum of its virtual stages).
    ``stage_memory[r]``: static bytes + activations of the microbatches in flight at the peak:
      gpipe: all n_mb; 1f1b / zero_bubble (vpp = 1): min(pp - r, n_mb); interleaved (vpp > 1):
      min(2(pp - r - 1) + (vpp - 1)pp + 1, n_mb vpp) chunks of the rank's mean chunk (Megatron's warm-up count
      + 1); dualpipev: min(pp + 1, n_mb) microbatches of the rank (DeepSeek-V3, Table 2).
    ``step_time`` = n_mb x max_r stage_time[r] + f x (pp - 1) x (slowest virtual stage), f = the schedule
      table's ``bubble``: 1, and 1/3 for zero_bubble (ZB-H1: B and W each ~1/3 of a fwd+bwd). With vpp = 1 that
      is (n_mb + pp - 1) x max rank time; with balanced chunks under interleaving it is Megatron's
      (n_mb + (pp - 1)/vpp) x max rank time. Communication, optimizer step and data loading are not modelled.
    """
    par = cfg.parallel
    pp, vpp = par.pp, par.vpp
    v = pp * vpp
    validate_split(list(split), cfg.model.n_layers, v)
    if len(costs) != cfg.model.n_layers + 2:
        raise ValueError(f"costs has {len(costs)} parts, the model has {cfg.model.n_layers + 2}")
    style = stage_style(par.schedule)
    n_mb = n_microbatches
    bounds = stage_bounds(list(split))
    vtime = [sum(c.time_s for c in costs[a:e]) for a, e in bounds]
    vact = [sum(c.activation_bytes for c in costs[a:e]) for a, e in bounds]
    vstatic = [sum(c.static_bytes for c in costs[a:e]) for a, e in bounds]
    rtime, ract, rstatic = [0.0] * pp, [0.0] * pp, [0.0] * pp
    rlayers: list[list[int]] = [[] for _ in range(pp)]
    for k in range(v):
        r = placement_rank(k, pp, style)
        rtime[r] += vtime[k]
        ract[r] += vact[k]
        rstatic[r] += vstatic[k]
        rlayers[r].append(split[k])
    sched = par.schedule
    mem = []
    for r in range(pp):
        if sched == "gpipe":
            inflight = float(n_mb)
        elif sched == "dualpipev":
            inflight = float(min(pp + 1, n_mb))
        elif vpp > 1:  # interleaved 1F1B (also 1f1b / zero_bubble configured with vpp > 1)
            chunks = min(2 * (pp - r - 1) + (vpp - 1) * pp + 1, n_mb * vpp)
            inflight = chunks / vpp
        else:
            inflight = float(min(pp - r, n_mb))
        mem.append(rstatic[r] + inflight * ract[r])
    bubble = (pp - 1) * max(vtime) * schedule_info(sched).bubble
    return {
        "split": list(split), "stage_time": rtime, "stage_memory": mem, "step_time": n_mb * max(rtime) + bubble,
        "virtual_stage_time": vtime, "rank_layers": rlayers, "n_microbatches": n_mb, "dp": dp,
        "bubble_s": bubble, "schedule": sched,
    }
