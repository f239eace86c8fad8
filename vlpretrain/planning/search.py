"""Every layout of a world size that the engine accepts, ranked by the cost model (``vlpretrain plan --search``).

Dimensions: tp (dividing heads, kv heads, ffn and vocab, inside a node), pp (up to the layers), the schedule
and vpp (1f1b; interleaved 1F1B with vpp 2, 3, 4; zero_bubble, ZB-V and DualPipeV with vpp 2), dp = the rest,
micro batch (1 .. 16, the global batch permitting), recompute (none / full: ``selective`` keeps the same
activation estimate in the model, so it never differs from ``none``), the first stage's image split under TP
(images / replicate), FSDP's reshard-after-forward (auto / false) and, where the engine has
``parallel.dp_shard`` (HSDP), node-sized shard groups. Each candidate goes through ``config.validate`` and
``layout_rules.microbatch_problem`` (what ``resolve_layout`` checks); the survivors are scored with a uniform
split, the best ``REFINE`` (and the best single-chunk layout of every (tp, pp)) get their mix-aware split
(``partition_mix`` over the step mix, with the fitted per-part times), are re-scored and checked once more by
``resolve_layout`` with that split, so a written config trains with exactly the layout scored. A layout whose
memory per GPU exceeds the cluster's is rejected with the amount.
"""
from __future__ import annotations

import dataclasses
import time

from vlpretrain.config import Config, ConfigError, validate
from vlpretrain.data.step_mix import StepType, assumed_mix
from vlpretrain.layout_rules import microbatch_problem, schedule_info
from vlpretrain.parallel.mesh import resolve_layout
from vlpretrain.parallel.pipeline_split import uniform_split
from vlpretrain.parallel.pipeline_split_mix import partition_mix
from vlpretrain.planning.cluster import Cluster
from vlpretrain.planning.cost import GIB, LayoutSpec, estimate, part_seconds
from vlpretrain.planning.efficiency import efficiency_fn, load_table
from vlpretrain.planning.parts import config_parts, model_flops_per_step

REFINE = 8  # best uniform-split layouts that get their mix-aware split (vpp > 1: ~1 s each)
MICRO_BATCHES = (1, 2, 4, 8, 16)
TIME_KEYS = ("compute_s", "tp_comm_s", "pp_send_s", "bubble_s", "fsdp_exposed_s", "optimizer_s")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _schedules(pp: int, n_stages_max: int) -> list[tuple[str, int]]:
    if pp == 1:
        return [("1f1b", 1)]
    out = [("1f1b", 1)]
    out += [("interleaved_1f1b", v) for v in (2, 3, 4) if pp * v <= n_stages_max]
    out += [(s, 2) for s in ("zero_bubble", "zbv", "dualpipev") if 2 * pp <= n_stages_max]
    return out


def with_layout(cfg: Config, **kw) -> Config:
    """``cfg`` with parallel fields and ``micro_batch_size`` replaced."""
    mbs = kw.pop("micro_batch_size", cfg.train.micro_batch_size)
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **kw),
                               train=dataclasses.replace(cfg.train, micro_batch_size=mbs))


def candidates(cfg: Config, world: int, cl: Cluster, hsdp: bool) -> tuple[list[Config], dict[str, int]]:
    """Every candidate config that passes ``validate`` and the microbatch rule; and rejection counts by reason."""
    m, t = cfg.model, cfg.train
    images = cfg.train.stage in (1, 2, 3)  # every DeepSeek-VL stage has image steps
    out, rejected = [], {}
    for tp in [d for d in _divisors(world) if d <= cl.gpus_per_node]:
        for pp in [d for d in _divisors(world // tp) if d <= m.n_layers]:
            dp = world // (tp * pp)
            shards = [0] + ([d for d in _divisors(dp) if d * tp in (cl.gpus_per_node, 2 * cl.gpus_per_node)
                             and d < dp] if hsdp else [])
            for sched, vpp in _schedules(pp, m.n_layers + 2):
                for mbs in MICRO_BATCHES:
                    bad = microbatch_problem(t.global_batch_size, mbs, dp, pp, vpp, sched)
                    if bad is not None:
                        rejected[bad[1].split(" (")[0][:60]] = rejected.get(bad[1].split(" (")[0][:60], 0) + 1
                        continue
                    for ac in ("none", "full"):
                        for vs in (("images", "replicate") if tp > 1 and images else (cfg.parallel.vision_split,)):
                            for reshard in (("auto", False) if dp > 1 else ("auto",)):
                                for shard in shards:
                                    kw = dict(tp=tp, pp=pp, vpp=vpp, dp=dp, schedule=sched, micro_batch_size=mbs,
                                              activation_checkpointing=ac, vision_split=vs,
                                              fsdp_reshard_after_forward=reshard, layer_split="uniform")
                                    if hsdp:
                                        kw["dp_shard"] = shard
                                    cand = with_layout(cfg, **kw)
                                    try:
                                        validate(cand)
                                    except ConfigError as e:
                                        key = str(e).split(":")[1].strip() if ":" in str(e) else str(e)
                                        rejected[key] = rejected.get(key, 0) + 1
                                        continue
                                    out.append(cand)
    return out, rejected


def evaluate(cfg: Config, world: int, cl: Cluster, mix: list[StepType], split: list[int] | None = None,
             table: dict | None = None, mix_aware: bool = False) -> dict:
    """Expected step time over ``mix`` and the largest memory of any step type for ``cfg``'s layout; the split
    given, or the mix-aware one (``mix_aware``), or uniform."""
    table = table if table is not None else load_table()
    par, t = cfg.parallel, cfg.train
    eff = efficiency_fn(cl.family, table)
    ratio = table.get("attention_ratio", 1.0)
    dp = world // (par.tp * par.pp)
    n_mb = t.global_batch_size // (t.micro_batch_size * dp)
    v = par.pp * par.vpp
    parts = [_parts(cfg, st) for st in mix]
    shares = [st.share / sum(x.share for x in mix) for st in mix]
    if split is None:
        if mix_aware and par.pp > 1:
            peak = cl.peak_tflops * 1e12
            times = tuple(tuple(round(part_seconds(p, peak, eff, ratio), 9) for p in ps) for ps in parts)
            key = (times, tuple(shares), v, par.pp, par.schedule, n_mb)
            if key not in _SPLIT_CACHE:
                _SPLIT_CACHE[key] = partition_mix([list(t) for t in times], shares, v, par.pp, par.schedule,
                                                  n_mb)["split"]
            split = _SPLIT_CACHE[key]
        else:
            split = uniform_split(cfg.model.n_layers, v)
    lay = LayoutSpec(tp=par.tp, pp=par.pp, vpp=par.vpp, dp=dp, schedule=par.schedule, n_microbatches=n_mb,
                     split=tuple(split), boundary_bytes=2 * t.micro_batch_size * t.seq_len * cfg.model.dim,
                     dp_shard=getattr(par, "dp_shard", 0) or 0)
    tokens = t.global_batch_size * t.seq_len
    flops_by_type = [model_flops_per_step(cfg, st) for st in mix]
    per = [estimate(ps, lay, cl, eff, tokens, f, ratio) for ps, f in zip(parts, flops_by_type)]
    step = sum(w * p["step_time_s"] for w, p in zip(shares, per))
    worst_mem = max(per, key=lambda p: p["memory_gib"])
    flops = sum(w * f for w, f in zip(shares, flops_by_type))
    out = {k: sum(w * p[k] for w, p in zip(shares, per)) for k in TIME_KEYS}
    out.update({"step_time_s": step, "tokens_per_s_per_gpu": tokens / step / world,
                "mfu": flops / (step * world * cl.peak_tflops * 1e12), "memory_gib": worst_mem["memory_gib"],
                "memory_parts_gib": worst_mem["memory_parts_gib"], "layer_split": list(split), "n_microbatches": n_mb,
                "dp": dp, "step_time_by_type": {st.name: p["step_time_s"] for st, p in zip(mix, per)}})
    out["exposed_comm_s"] = out["tp_comm_s"] + out["pp_send_s"] + out["fsdp_exposed_s"]
    return out


_PARTS_CACHE: dict[tuple, list] = {}
_SPLIT_CACHE: dict[tuple, list[int]] = {}


def _parts(cfg: Config, st: StepType) -> list:
    """``config_parts``, cached on what it reads of the layout (the search scores thousands of layouts that
    share a few part lists: pp, vpp, the schedule and dp do not change a part)."""
    p = cfg.parallel
    key = (id(cfg.model), cfg.train.stage, tuple(cfg.train.trainable), cfg.train.seq_len, cfg.train.dtype,
           cfg.train.micro_batch_size, p.tp, p.sequence_parallel, p.activation_checkpointing, p.vision_split,
           p.fsdp_reshard_after_forward, p.fsdp_keep_gathered_below_mb, st)
    if key not in _PARTS_CACHE:
        if len(_PARTS_CACHE) > 4096:
            _PARTS_CACHE.clear()
        _PARTS_CACHE[key] = config_parts(cfg, st)
    return _PARTS_CACHE[key]


def layout_of(cfg: Config, est: dict) -> dict:
    p = cfg.parallel
    row = {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "dp": est["dp"], "micro_batch_size": cfg.train.micro_batch_size,
           "schedule": p.schedule, "activation_checkpointing": p.activation_checkpointing,
           "layer_split": est["layer_split"], "vision_split": p.vision_split,
           "fsdp_reshard_after_forward": p.fsdp_reshard_after_forward, "n_microbatches": est["n_microbatches"]}
    if hasattr(p, "dp_shard"):
        row["dp_shard"] = p.dp_shard
    return row


def _why_slower(best: dict, other: dict) -> str:
    diffs = {k: other[k] - best[k] for k in TIME_KEYS}
    worst = max(diffs, key=diffs.get)
    pct = (other["step_time_s"] / best["step_time_s"] - 1) * 100
    return f"{pct:+.1f}% step time: {worst[:-2].replace('_', ' ')} +{diffs[worst] * 1e3:.0f} ms/step"


def _mixes(cfg: Config, read_mix) -> dict[int, list[StepType]]:
    return {mbs: read_mix(with_layout(cfg, micro_batch_size=mbs)) for mbs in MICRO_BATCHES}


def search(cfg: Config, world: int, cl: Cluster, top: int = 5, hsdp: bool | None = None,
           table: dict | None = None, read_mix=assumed_mix) -> dict:
    """Rank every accepted layout of ``world`` GPUs for ``cfg`` on ``cl`` (module docstring)."""
    t0 = time.perf_counter()
    table = table if table is not None else load_table()
    hsdp = hasattr(cfg.parallel, "dp_shard") if hsdp is None else hsdp
    cands, rejected = candidates(cfg, world, cl, hsdp and hasattr(cfg.parallel, "dp_shard"))
    if not cands:
        raise ConfigError(f"config error: no layout of {world} GPUs is valid for this config "
                          f"({'; '.join(f'{k} x{n}' for k, n in list(rejected.items())[:3])})")
    mixes = _mixes(cfg, read_mix)
    scored = [(c, evaluate(c, world, cl, mixes[c.train.micro_batch_size], table=table)) for c in cands]
    fits = [(c, e) for c, e in scored if e["memory_gib"] <= cl.mem_gib]
    oom = sorted(((e["memory_gib"] - cl.mem_gib, c, e) for c, e in scored if e["memory_gib"] > cl.mem_gib),
                 key=lambda x: x[0])
    fits.sort(key=lambda ce: ce[1]["step_time_s"])
    pick, seen = fits[:max(REFINE, top)], set()
    for c, e in fits:  # the best of every (tp, pp) family too (its exact DP split is cheap when vpp = 1)
        key = (c.parallel.tp, c.parallel.pp)
        if key not in seen and c.parallel.vpp == 1:
            seen.add(key)
            if all(c is not p for p, _ in pick):
                pick.append((c, e))
    refined = []
    for c, _ in pick:
        e = evaluate(c, world, cl, mixes[c.train.micro_batch_size], table=table, mix_aware=True)
        final = with_layout(c, layer_split=e["layer_split"])
        resolve_layout(final, world)  # the engine's own check of the layout as it will be written
        if e["memory_gib"] <= cl.mem_gib:
            refined.append((final, e))
    refined.sort(key=lambda ce: ce[1]["step_time_s"])
    if not refined:
        gap, c, e = oom[0]
        raise ConfigError(f"config error: no layout of {world} GPUs fits {cl.mem_gib:g} GiB per GPU: the smallest "
                          f"needs {e['memory_gib']:.1f} GiB ({_short(c, e)})")
    best_cfg, best = refined[0]
    ranked = [{**layout_of(c, e), **e} for c, e in refined[:top]]
    for row, (_c, e) in zip(ranked[1:], refined[1:top]):
        row["why_not_best"] = _why_slower(best, e)
    oom_rows = [{**layout_of(c, e), "memory_gib": e["memory_gib"], "step_time_s": e["step_time_s"],
                 "why_not_best": f"out of memory by {gap:.1f} GiB ({e['memory_gib']:.1f} of {cl.mem_gib:g})"}
                for gap, c, e in sorted(oom, key=lambda x: x[2]["step_time_s"])[:3]
                if e["step_time_s"] < best["step_time_s"]]
    return {"world_size": world, "cluster": dataclasses.asdict(cl), "candidates": len(cands),
            "fit_memory": len(fits), "out_of_memory": len(oom), "invalid": rejected,
            "search_seconds": round(time.perf_counter() - t0, 2), "best": ranked[0], "top": ranked,
            "faster_but_out_of_memory": oom_rows, "best_config": best_cfg}


def evaluate_config(cfg: Config, world: int | None, cl: Cluster, read_mix=assumed_mix) -> dict:
    """The cost model's prediction for the config's own layout (``resolve_layout`` first: its errors are the
    engine's; ``world`` None: the config's degrees), in the same shape as a search row."""
    lay = resolve_layout(cfg, world)
    world = lay.world_size
    c = with_layout(cfg, dp=lay.dp, layer_split=list(lay.split))
    e = evaluate(c, world, cl, read_mix(c), split=list(lay.split))
    return {**layout_of(c, e), **e}


def _short(c: Config, e: dict) -> str:
    p = c.parallel
    return (f"tp={p.tp} pp={p.pp} vpp={p.vpp} dp={e['dp']} mbs={c.train.micro_batch_size} {p.schedule} "
            f"recompute={p.activation_checkpointing}")


def describe(row: dict) -> str:
    sched = row["schedule"] if row["pp"] > 1 else "-"
    shard = f" dp_shard={row['dp_shard']}" if row.get("dp_shard") else ""
    return (f"tp={row['tp']} pp={row['pp']} vpp={row['vpp']} dp={row['dp']}{shard} mbs={row['micro_batch_size']} "
            f"{sched} recompute={row['activation_checkpointing']} vision={row['vision_split']} "
            f"reshard={row['fsdp_reshard_after_forward']}")


__all__ = ["GIB", "describe", "evaluate", "schedule_info", "search"]
