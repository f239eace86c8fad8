"""Step time and memory per GPU of one layout, from the model's pipeline parts and the cluster.

Input: the parts ``embed, layers.0 .. layers.N-1, head`` (``Part``: one microbatch on one device of the TP
group), a ``LayoutSpec`` and a ``Cluster``. The mesh is the engine's (pp, dp, tp), tp innermost: a TP group
spans tp consecutive ranks, an FSDP shard group d x tp (HSDP: d = ``dp_shard``, replicas across groups), a
pipeline neighbour is dp x tp ranks away.

Time of one step (the slowest pipeline rank):
* compute per part = FLOPs / (peak x efficiency(gpu, matmul width)), the efficiency table fitted to published
  runs (``efficiency.py``); attention FLOPs causal (half the S x S scores; packed documents are not credited),
  at the fitted ``attention_ratio`` x that efficiency (flash kernels run below the matmuls); recompute as a
  second forward;
* TP / SP: per decoder layer and microbatch 4 forward + 4 backward all-gather / reduce-scatter of the layer's
  activations (b x s x h bf16; +4 with full recompute), not overlapped (DTensor TP runs them inline); the first
  stage's image split adds the all-gather (and backward reduce-scatter) of the adaptor outputs;
* pipeline: point-to-point sends of b x s x h bf16 are asynchronous (batched isend / irecv) and hide behind
  compute in the steady state; the 2 (pp - 1) sends of the fill and the drain are exposed; the fill/drain bubble
  of the schedule table (``layout_rules``) x (pp - 1) x the slowest virtual stage, so stage imbalance counts;
* FSDP (the engine's rules): each unit's bf16 all-gather before its forward and, when resharded after forward,
  again before its backward, prefetched under the previous unit's compute (exposed: what exceeds the compute,
  plus the first unit's gather); units that keep their parameters gathered (``fsdp_reshard_after_forward``)
  gather once per step; fp32 gradients are reduce-scattered once per step, during the last microbatch's
  backward (the engine syncs once); HSDP adds the all-reduce of the gradient shards across replicas;
  ``ddp`` / ``zero1`` (published Megatron runs) all-reduce / reduce-scatter gradients the same way;
* optimizer: AdamW over the local fp32 shard, memory-bound: 28 bytes per parameter / HBM bandwidth.

Memory per GPU (the largest pipeline rank): FSDP keeps fp32 parameters, fp32 gradients and AdamW's two fp32
states sharded over d; the gathered bf16 parameters of the units in flight (two resharded units: the current
one and the prefetched one; every kept-gathered unit); the UNSHARDED fp32 gradients accumulated between
microbatches when there are several (the engine syncs once per step, so FSDP2 holds them in full); the
activations of the microbatches in flight for the schedule (``pipeline_cost.inflight_microbatches``), with the
recompute mode's activation estimate and the vocab-parallel logits of ``pipeline_cost``; plus a margin for the
CUDA context and NCCL buffers (``CONTEXT_GIB``) and the caching allocator's fragmentation (``FRAGMENTATION``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vlpretrain.layout_rules import placement_rank, schedule_info
from vlpretrain.parallel.pipeline_cost import inflight_microbatches
from vlpretrain.parallel.pipeline_split import stage_bounds
from vlpretrain.planning.cluster import Cluster, collective_s

CONTEXT_GIB = 1.5  # CUDA context + NCCL buffers + cuBLAS workspaces per GPU
FRAGMENTATION = 0.08  # share of the tensors' bytes the caching allocator loses to fragmentation
ADAM_BYTES = 28  # AdamW step per fp32 parameter: read p, g, m, v; write p, m, v
GIB = 2 ** 30


@dataclass(frozen=True)
class Part:
    """One pipeline part for one microbatch on one device of the TP group."""

    name: str
    flops: float  # forward + backward (+ recompute) FLOPs, attention causal
    fwd_flops: float
    attn_flops: float  # of ``flops``: the attention scores and their backward (run at ATTN efficiency)
    width: int  # the matmul width that decides the efficiency (hidden / tp)
    params: float  # parameters this TP rank holds of the part
    trainable: float
    act_bytes: float  # kept for backward per microbatch in flight
    tp_bytes: float = 0.0  # size of each TP collective (bytes)
    tp_colls: int = 0  # all-gathers + reduce-scatters per microbatch
    keep_gathered: bool = False  # FSDP unit kept gathered between forward and backward and across microbatches


@dataclass(frozen=True)
class LayoutSpec:
    tp: int
    pp: int
    vpp: int
    dp: int
    schedule: str
    n_microbatches: int
    split: tuple[int, ...]
    boundary_bytes: float  # one microbatch's hidden states between pipeline stages (b x s x h x 2)
    sharding: str = "fsdp"  # fsdp (the engine) | zero1 | ddp (published runs)
    dp_shard: int = 0  # HSDP shard group size; 0 = dp (plain FSDP)
    reduce_bytes: int = 4  # gradient reduction dtype (the engine reduces in fp32)


def _rank_parts(parts: list[Part], lay: LayoutSpec) -> tuple[list[list[Part]], list[int]]:
    """Parts per pipeline rank, and the rank of each virtual stage."""
    placement = schedule_info(lay.schedule).placement if lay.pp > 1 else "single"
    per_rank: list[list[Part]] = [[] for _ in range(lay.pp)]
    vranks = []
    for k, (a, e) in enumerate(stage_bounds(list(lay.split))):
        r = placement_rank(k, lay.pp, placement)
        per_rank[r].extend(parts[a:e])
        vranks.append(r)
    return per_rank, vranks


def _fsdp_exposed(units: list[Part], lay: LayoutSpec, cl: Cluster, fwd_s: float, bwd_s: float) -> float:
    """Exposed FSDP / data-parallel communication of one rank over a step (module docstring)."""
    d = lay.dp_shard or lay.dp
    n_mb = lay.n_microbatches
    trainable = sum(u.trainable for u in units)
    if lay.sharding != "fsdp":
        grads = collective_s("all_reduce" if lay.sharding == "ddp" else "reduce_scatter", lay.reduce_bytes * trainable,
                             lay.dp,
                             cl, lay.dp * lay.tp)
        return max(0.0, grads - bwd_s)
    span = d * lay.tp
    ag = [collective_s("all_gather", 2 * u.params, d, cl, span) for u in units]
    resharded = sum(a for a, u in zip(ag, units) if not u.keep_gathered)
    kept = sum(a for a, u in zip(ag, units) if u.keep_gathered)
    first = ag[0] if ag else 0.0
    exp_f = max(0.0, resharded - fwd_s) + first
    exp_b = max(0.0, resharded - bwd_s)
    grads = sum(collective_s("reduce_scatter", lay.reduce_bytes * u.trainable, d, cl, span) for u in units)
    if lay.dp > d:  # HSDP: the gradient shards all-reduced across the replicas
        grads += collective_s("all_reduce", lay.reduce_bytes * trainable / d, lay.dp // d, cl, lay.dp * lay.tp)
    last = max(0.0, grads + resharded - bwd_s) - exp_b
    return n_mb * (exp_f + exp_b) + last + kept


def _memory(units: list[Part], lay: LayoutSpec, act: float, inflight: float) -> dict[str, float]:
    """Bytes per GPU of one pipeline rank, by kind (module docstring)."""
    params = sum(u.params for u in units)
    tr = sum(u.trainable for u in units)
    d = lay.dp_shard or lay.dp
    if lay.sharding == "fsdp":
        states = (4 * params + 12 * tr) / d
        big = sorted((u.params for u in units if not u.keep_gathered), reverse=True)[:2]
        gathered = 2 * (sum(big) + sum(u.params for u in units if u.keep_gathered)) if d > 1 else 0.0
        accumulated = 4 * tr if lay.n_microbatches > 1 and d > 1 else 0.0
    else:  # Megatron: bf16 weights + fp32 main grads; the optimizer (master + m, v) sharded under zero1
        states = 2 * params + 4 * tr + 12 * tr / (lay.dp if lay.sharding == "zero1" else 1)
        gathered = accumulated = 0.0
    out = {"states": states, "gathered_params": gathered, "accumulated_grads": accumulated,
           "activations": inflight * act}
    out["margin"] = CONTEXT_GIB * GIB + FRAGMENTATION * sum(out.values())
    return out


def part_seconds(p: Part, peak: float, eff: Callable[[int], float], attention_ratio: float,
                 forward: bool = False) -> float:
    """Compute seconds of one part and microbatch (forward only: ``forward``)."""
    e = eff(p.width)
    attn = p.attn_flops * (p.fwd_flops / p.flops if forward and p.flops else 1.0)
    total = p.fwd_flops if forward else p.flops
    return (total - attn) / (peak * e) + attn / (peak * e * attention_ratio)


def estimate(parts: list[Part], lay: LayoutSpec, cl: Cluster, eff: Callable[[int], float],
             tokens_per_step: float, model_flops_per_step: float, attention_ratio: float = 1.0) -> dict:
    """Predicted step time (s), its parts, tokens/s per GPU, MFU and memory per GPU of ``lay`` (module doc)."""
    peak = cl.peak_tflops * 1e12
    per_rank, vranks = _rank_parts(parts, lay)
    send = collective_s("send", lay.boundary_bytes, 2, cl, lay.dp * lay.tp + 1) if lay.pp > 1 else 0.0
    bounds = stage_bounds(list(lay.split))
    vtime = []
    for a, e in bounds:
        t = sum(part_seconds(p, peak, eff, attention_ratio) for p in parts[a:e])
        t += sum(p.tp_colls * collective_s("all_gather", p.tp_bytes, lay.tp, cl, lay.tp) for p in parts[a:e])
        vtime.append(t)
    rtime = [0.0] * lay.pp
    for k, t in enumerate(vtime):
        rtime[vranks[k]] += t
    bubble = schedule_info(lay.schedule).bubble * (lay.pp - 1) * max(vtime) if lay.pp > 1 else 0.0
    world = lay.dp * lay.tp * lay.pp
    worst, worst_mem = None, None
    for r, units in enumerate(per_rank):
        comp = [part_seconds(p, peak, eff, attention_ratio) for p in units]
        fwd = sum(part_seconds(p, peak, eff, attention_ratio, forward=True) for p in units)
        fsdp = _fsdp_exposed(units, lay, cl, fwd, max(sum(comp) - fwd, 0.0))
        d = (lay.dp_shard or lay.dp) if lay.sharding == "fsdp" else (lay.dp if lay.sharding == "zero1" else 1)
        optim = ADAM_BYTES * sum(p.trainable for p in units) / d / (cl.hbm_gbps * 1e9)
        sends = 2 * (lay.pp - 1) * send
        total = lay.n_microbatches * rtime[r] + bubble + sends + fsdp + optim
        tp_comm = lay.n_microbatches * sum(p.tp_colls * collective_s("all_gather", p.tp_bytes, lay.tp, cl, lay.tp)
                                           for p in units)
        row = {"rank": r, "step_time_s": total, "compute_s": lay.n_microbatches * sum(comp), "tp_comm_s": tp_comm,
               "pp_send_s": sends, "bubble_s": bubble, "fsdp_exposed_s": fsdp,
               "optimizer_s": optim}
        if worst is None or total > worst["step_time_s"]:
            worst = row
        inflight = inflight_microbatches(lay.schedule, lay.pp, lay.vpp, r, lay.n_microbatches) if lay.pp > 1 \
            else 1.0
        mem = _memory(units, lay, sum(p.act_bytes for p in units), inflight)
        if worst_mem is None or sum(mem.values()) > sum(worst_mem.values()):
            worst_mem = dict(mem, rank=r)
    t = worst["step_time_s"]
    mem_rank = worst_mem.pop("rank")
    return {**worst, "stage_time_s": rtime, "virtual_stage_time_s": vtime,
            "tokens_per_s_per_gpu": tokens_per_step / t / world,
            "mfu": model_flops_per_step / (t * world * peak),
            "memory_gib": sum(worst_mem.values()) / GIB, "memory_rank": mem_rank,
            "memory_parts_gib": {k: v / GIB for k, v in worst_mem.items()}}
