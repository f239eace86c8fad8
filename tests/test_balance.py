"""Vision-aware pipeline splitter: uniform split, exact partition against brute force, the cost model on the real
configs (meta device), predictions, explicit splits, ``vlpretrain plan`` and measured part times (tiny model)."""
from __future__ import annotations

import io
import itertools
import json
import random
import time
from contextlib import redirect_stdout

import pytest
from conftest import CONFIGS, TINY

from vlpretrain.cli import main
from vlpretrain.config import ConfigError, load_config, trainable_parts
from vlpretrain.data.step_mix import StepType
from vlpretrain.layout_rules import placement_rank
from vlpretrain.models.flops import step_flops
from vlpretrain.models.vlm import build_model  # noqa: F401 - import timm before anything is timed
from vlpretrain.parallel import pipeline_cost, pipeline_split
from vlpretrain.parallel.mesh import resolve_layout
from vlpretrain.parallel.pipeline_cost import part_costs, predict
from vlpretrain.parallel.pipeline_split import partition, partition_details, uniform_split, validate_split
from vlpretrain.parallel.pipeline_split_mix import resolve_layer_split as _resolve
from vlpretrain.plan import measure_part_times, plan

SEVEN_B = CONFIGS / "deepseek-vl-7b"


def _cfg(stage: int = 2, *overrides: str, model: str = "deepseek-vl-7b"):
    return load_config(CONFIGS / model / f"stage{stage}.yaml", list(overrides))


def resolve_layer_split(cfg, **kw):
    """The split for the config's own microbatch count (dp 1)."""
    return _resolve(cfg, _n_mb(cfg), **kw)


def _predict(cfg, split, costs, world_size=None):
    p = cfg.parallel
    dp = p.dp if isinstance(p.dp, int) else (world_size // (p.tp * p.pp) if world_size else 1)
    return predict(cfg, split, costs, _n_mb(cfg, world_size), dp)


def _n_mb(cfg, world_size=None):
    p = cfg.parallel
    dp = p.dp if isinstance(p.dp, int) else (world_size // (p.tp * p.pp) if world_size else 1)
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def _brute(costs: list[float], n_stages: int, pp: int, style: str = "loop") -> tuple[float, list[list[int]]]:
    """Best slowest-rank time over every contiguous split into non-empty stages, and all splits reaching it."""
    n_parts = len(costs)
    results = []
    for cuts in itertools.combinations(range(1, n_parts), n_stages - 1):
        b = [0, *cuts, n_parts]
        loads = [0.0] * pp
        for k in range(n_stages):
            loads[placement_rank(k, pp, style)] += sum(costs[b[k]:b[k + 1]])
        counts = [(b[k + 1] - b[k]) - (k == 0) - (k == n_stages - 1) for k in range(n_stages)]
        results.append((max(loads), counts))
    best = min(v for v, _ in results)
    return best, [c for v, c in results if v <= best * (1 + 1e-9)]


def _rank_max(costs, split, pp, style="loop"):
    loads = [0.0] * pp
    for k, (a, e) in enumerate(pipeline_split.stage_bounds(split)):
        loads[placement_rank(k, pp, style)] += sum(costs[a:e])
    return max(loads)


# ---------------------------------------------------------------------------------------------------------------
# splits


def test_uniform_split():
    assert uniform_split(30, 4) == [8, 8, 7, 7]
    assert uniform_split(24, 4) == [6, 6, 6, 6]
    assert uniform_split(30, 8) == [4, 4, 4, 4, 4, 4, 3, 3]
    assert uniform_split(5, 3) == [2, 2, 1]
    assert uniform_split(7, 1) == [7]
    assert uniform_split(3, 5) == [1, 1, 1, 0, 0]  # arithmetic only: validate_split rejects the empty middle stage
    with pytest.raises(ConfigError):
        validate_split([1, 1, 1, 0, 0], 3, 5)
    validate_split([0, 3, 0], 3, 3)  # embed alone, head alone: allowed


def test_partition_heavy_embed_known_optimum():
    costs = [10, 1, 1, 1, 1, 1, 1, 1]  # embed, 6 layers, head
    split = partition(costs, 2, 2)
    best, _ = _brute(costs, 2, 2)
    assert best == 10 and _rank_max(costs, split, 2) == 10
    assert split == [0, 6]  # embed alone on rank 0
    assert partition([1, 1, 1, 1, 1, 1, 1, 10], 2, 2) == [6, 0]  # heavy head: ties go front-light -> [6, 0] only
    # heavy head, 3 stages: head alone last, the 6 layers + embed split 3+4
    costs = [1, 1, 1, 1, 1, 1, 1, 6]
    split = partition(costs, 3, 3)
    assert _rank_max(costs, split, 3) == _brute(costs, 3, 3)[0] == 6
    assert split[-1] == 0


def test_partition_matches_brute_force_vpp1():
    rng = random.Random(0)
    for _ in range(150):
        n_layers = rng.randint(1, 10)
        pp = rng.randint(1, min(4, n_layers + 2))
        costs = [rng.uniform(0, 10) for _ in range(n_layers + 2)]
        if rng.random() < 0.3:
            costs = [float(rng.randint(1, 3)) for _ in costs]  # many ties
        split = partition(costs, pp, pp)
        validate_split(split, n_layers, pp)
        best, optimal_splits = _brute(costs, pp, pp)
        assert _rank_max(costs, split, pp) == pytest.approx(best, rel=1e-9)
        assert split == min(optimal_splits)  # tie-break: fewest layers on the earliest stages


@pytest.mark.parametrize("style", ["loop", "v"])
def test_partition_matches_brute_force_vpp2(style):
    rng = random.Random(1 if style == "loop" else 2)
    for _ in range(80):
        pp = rng.randint(1, 3)
        vpp = rng.choice([2, 3]) if style == "loop" else 2
        v = pp * vpp
        n_layers = rng.randint(max(v - 2, 0), 10)
        costs = [rng.uniform(0.1, 10) for _ in range(n_layers + 2)]
        if rng.random() < 0.3:
            costs = [float(rng.randint(1, 3)) for _ in costs]
        det = partition_details(costs, v, pp, style)
        validate_split(det["split"], n_layers, v)
        best, _ = _brute(costs, v, pp, style)
        assert det["exact"]
        assert det["value"] == pytest.approx(best, rel=1e-9)
        assert _rank_max(costs, det["split"], pp, style) == pytest.approx(best, rel=1e-9)


def test_partition_rejects_bad_input():
    with pytest.raises(ValueError):
        partition([1, 1, 1], 3, 2)  # not a multiple of pp
    with pytest.raises(ValueError):
        partition([1, -1, 1], 1, 1)
    with pytest.raises(ValueError):
        partition([1, 1, 1], 4, 4)  # more stages than parts


# ---------------------------------------------------------------------------------------------------------------
# cost model on the real configs (meta device)


def test_part_flops_sum_to_step_flops():
    for stage in (1, 2, 3):
        cfg = _cfg(stage)
        for ips in (0.0, 1.0, 2.5):
            costs = part_costs(cfg, images_per_sample=ips)
            b = cfg.train.micro_batch_size
            ref = step_flops(cfg.model, b, cfg.train.seq_len, b * ips, trainable_parts(cfg))
            assert sum(c.flops for c in costs) == pytest.approx(ref.total, rel=1e-12)
            assert sum(c.forward_flops for c in costs) == pytest.approx(ref.forward, rel=1e-12)


def test_parameters_from_meta_model():
    cfg = _cfg(2)
    costs = part_costs(cfg)
    model = build_model(cfg.model, "meta")
    assert sum(c.params for c in costs) == sum(p.numel() for p in model.parameters())
    assert costs[1].params == sum(p.numel() for p in model.layers["0"].parameters())
    assert costs[-1].params == sum(p.numel() for p in model.head.parameters())
    # stage 2: adaptor + text embedding learn, the towers are frozen
    emb = model.embed
    assert costs[0].trainable_params == (sum(p.numel() for p in emb.adaptor.parameters())
                                         + emb.tok_embeddings.weight.numel())
    assert costs[1].static_bytes == 18 * costs[1].params  # bf16 weight + fp32 master, grad, AdamW m and v


def test_trainable_siglip_makes_embed_heavier():
    s2, s3 = part_costs(_cfg(2)), part_costs(_cfg(3))
    assert s3[0].time_s > s2[0].time_s and s3[0].flops > s2[0].flops
    assert s3[0].static_bytes > s2[0].static_bytes and s3[0].activation_bytes > s2[0].activation_bytes
    assert s3[1].time_s == pytest.approx(s2[1].time_s)  # decoder layers and head unchanged
    assert s3[-1].time_s == pytest.approx(s2[-1].time_s)
    # nothing trainable upstream of the decoder: embed runs no backward and keeps no activations
    only_llm = part_costs(_cfg(2, "train.trainable=[llm]"))
    assert only_llm[0].flops == only_llm[0].forward_flops and only_llm[0].activation_bytes == 0
    # stage 1 (adaptor only): the frozen decoder still runs activation grads (2x forward), no weight grads
    s1 = part_costs(_cfg(1))
    assert s1[1].flops == pytest.approx(2 * s1[1].forward_flops) and s1[1].activation_bytes > 0


def test_tp_and_checkpointing():
    base, tp2 = part_costs(_cfg(2)), part_costs(_cfg(2, "parallel.tp=2"))
    assert tp2[1].time_s == pytest.approx(base[1].time_s / 2)  # decoder layers are tensor-parallel
    assert tp2[-1].time_s == pytest.approx(base[-1].time_s / 2)
    # one image per microbatch: split or not, one TP rank encodes it
    assert tp2[0].time_s == pytest.approx(base[0].time_s)
    rep4 = part_costs(_cfg(2, "parallel.tp=2", "parallel.vision_split=replicate"), images_per_sample=4)
    split4 = part_costs(_cfg(2, "parallel.tp=2"), images_per_sample=4)
    assert split4[0].time_s < 0.51 * rep4[0].time_s  # 4 images: each TP rank encodes 2 (text embedding ~0)
    assert part_costs(_cfg(2, "parallel.tp=4"), image_counts=(1, 3))[0].time_s == pytest.approx(tp2[0].time_s)
    assert tp2[0].static_bytes == base[0].static_bytes
    full = part_costs(_cfg(2, "parallel.activation_checkpointing=full"))
    assert full[1].flops == pytest.approx(base[1].flops + base[1].forward_flops)  # one recomputed forward
    assert full[1].activation_bytes < base[1].activation_bytes / 10


def test_auto_balances_7b_stage2_pp4():
    cfg = _cfg(2, "parallel.pp=4")
    assert cfg.parallel.layer_split == "auto"
    uni = resolve_layer_split(_cfg(2, "parallel.pp=4", "parallel.layer_split=uniform"))
    auto = resolve_layer_split(cfg)
    assert uni == [8, 8, 7, 7] and sum(auto) == cfg.model.n_layers == 30 and len(auto) == 4
    costs = part_costs(cfg)
    pu, pa = _predict(cfg, uni, costs), _predict(cfg, auto, costs)
    assert pa["step_time"] < pu["step_time"]
    assert max(pa["stage_time"]) < max(pu["stage_time"])
    assert auto[0] <= uni[0]
    # At 1 image per 4096-token sequence the frozen towers cost ~0.24 decoder layers and the 102400-token head
    # ~1.8: the gain comes from the last rank. With a packed multimodal sequence (4 images) the first stage
    # is heavy enough that rank 0 gets fewer layers than the uniform split gives it.
    costs4 = part_costs(cfg, images_per_sample=4)
    auto4 = resolve_layer_split(cfg, mix=[StepType("multimodal", 1.0, (4,))])  # multimodal steps only
    assert auto4[0] < uni[0] and sum(auto4) == 30
    assert _predict(cfg, auto4, costs4)["step_time"] < _predict(cfg, uni, costs4)["step_time"]
    # the stage-3 embed (trainable SigLIP) is heavier than stage 2's under the same layout
    assert part_costs(_cfg(3, "parallel.pp=4"))[0].time_s > costs[0].time_s


def test_explicit_split_passthrough_and_validation():
    cfg = _cfg(2, "parallel.pp=4", "parallel.layer_split=[6,8,8,8]")
    assert resolve_layer_split(cfg) == [6, 8, 8, 8]
    with pytest.raises(ConfigError):  # empty middle stage
        resolve_layer_split(_cfg(2, "parallel.pp=3", "parallel.layer_split=[15,0,15]"))
    with pytest.raises(ConfigError):  # sum checked by config.py already
        _cfg(2, "parallel.pp=4", "parallel.layer_split=[6,8,8,7]")
    cfg = _cfg(2, "parallel.pp=2", "parallel.vpp=2", "parallel.schedule=interleaved_1f1b",
               "parallel.layer_split=uniform")
    assert resolve_layer_split(cfg) == [8, 8, 7, 7]


def test_measured_times_override_model():
    cfg = load_config(TINY / "stage2.yaml", ["parallel.pp=2"])
    names = pipeline_split.part_names(cfg.model.n_layers)
    measured = {n: 1.0 for n in names}
    measured["embed"] = 3.0
    costs = part_costs(cfg, measured=measured)
    assert [c.time_s for c in costs] == [measured[n] for n in names]
    # rank loads (3 + k, 5 - k) for k layers on rank 0: k = 1 balances them
    only_mm = [StepType("multimodal", 1.0, (cfg.train.micro_batch_size,))]  # the measured image count
    assert resolve_layer_split(cfg, measured=measured, mix=only_mm) == [1, 3]
    with pytest.raises(ValueError):
        part_costs(cfg, measured={"embed": 1.0})


def test_predict_schedules():
    cfg = _cfg(2, "parallel.pp=4")
    costs = part_costs(cfg)
    split = [8, 8, 8, 6]
    p = _predict(cfg, split, costs)
    n_mb = cfg.train.global_batch_size // cfg.train.micro_batch_size  # dp = 1 without a world size
    assert p["n_microbatches"] == n_mb
    assert p["step_time"] == pytest.approx((n_mb + 3) * max(p["stage_time"]))
    p64 = _predict(cfg, split, costs, world_size=64)  # dp = 64 / 4 = 16
    assert p64["dp"] == 16 and p64["n_microbatches"] == n_mb // 16
    # 1F1B: rank r keeps pp - r microbatches in flight
    act = [sum(c.activation_bytes for c in costs[a:e]) for a, e in pipeline_split.stage_bounds(split)]
    static = [sum(c.static_bytes for c in costs[a:e]) for a, e in pipeline_split.stage_bounds(split)]
    assert p["stage_memory"] == pytest.approx([static[r] + (4 - r) * act[r] for r in range(4)])
    gp = _predict(_cfg(2, "parallel.pp=4", "parallel.schedule=gpipe"), split, costs, world_size=64)
    assert all(g > m for g, m in zip(gp["stage_memory"], p64["stage_memory"]))
    split8 = [4, 4, 4, 4, 4, 4, 3, 3]  # zero bubble runs several (here 2) stages per rank, like interleaving
    zb = _predict(_cfg(2, "parallel.pp=4", "parallel.vpp=2", "parallel.schedule=zero_bubble"), split8, costs)
    il = _predict(_cfg(2, "parallel.pp=4", "parallel.vpp=2", "parallel.schedule=interleaved_1f1b"), split8, costs)
    assert zb["step_time"] < il["step_time"]
    # interleaved with equal chunks: Megatron's (n_mb + (pp - 1) / vpp) x rank time
    icfg = _cfg(2, "parallel.pp=2", "parallel.vpp=2", "parallel.schedule=interleaved_1f1b",
                "model.n_layers=10", "train.global_batch_size=16")
    flat = [pipeline_cost.PartCost(name=n, time_s=1.0, memory_bytes=0.0, flops=0.0)
            for n in pipeline_split.part_names(10)]
    ip = _predict(icfg, [2, 3, 3, 2], flat)  # every virtual stage costs 3
    assert ip["stage_time"] == [6.0, 6.0]
    assert ip["step_time"] == pytest.approx((16 + 1 / 2) * 6.0)
    with pytest.raises(ConfigError):
        resolve_layout(cfg, 6)  # not divisible by tp x pp


# ---------------------------------------------------------------------------------------------------------------
# CLI and measurement


def _run_cli(argv: list[str]) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(argv) == 0
    return buf.getvalue()


def test_plan_json_7b_fast():
    pipeline_cost._PARAM_CACHE.clear()  # time the meta-device build too
    t0 = time.process_time()  # CPU time: robust to other jobs on a shared machine
    out = _run_cli(["plan", "--config", str(SEVEN_B / "stage2.yaml"), "--set", "parallel.pp=4", "--json"])
    elapsed = time.process_time() - t0
    data = json.loads(out)
    assert set(data) == {"uniform", "multimodal_only", "auto", "mix"}
    assert [m["name"] for m in data["mix"]] == ["text", "multimodal"]  # no data here: the assumed mix
    for v in (data["uniform"], data["multimodal_only"], data["auto"]):
        assert set(v) == {"split", "stage_time", "stage_memory", "step_time"}
        assert sum(v["split"]) == 30 and len(v["stage_time"]) == len(v["stage_memory"]) == 4
    assert data["uniform"]["split"] == [8, 8, 7, 7]
    assert data["auto"]["step_time"] < data["uniform"]["step_time"]
    assert elapsed < 2.0, elapsed
    text = _run_cli(["plan", "--config", str(SEVEN_B / "stage2.yaml"), "--set", "parallel.pp=4"])
    assert "auto / uniform step time" in text and "[8, 8, 7, 7]" in text


def test_measure_part_times_tiny(one_thread):
    cfg = load_config(TINY / "stage2.yaml", ["train.micro_batch_size=2", "train.seq_len=64", "parallel.pp=2"])
    times = measure_part_times(cfg, steps=1)
    assert list(times) == pipeline_split.part_names(cfg.model.n_layers)
    assert all(t > 0 for t in times.values())
    assert len({times[n] for n in times if n.startswith("layers.")}) == 1  # identical blocks: one pooled time
    result = plan(cfg, measured=times)
    assert result["auto"]["step_time"] <= result["uniform"]["step_time"] * (1 + 1e-9)
    assert sum(result["auto"]["split"]) == cfg.model.n_layers
