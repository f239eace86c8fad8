"""One schedule table (layout_rules.py) for config checks, layout, partitioner and runtime; the mix-aware
partitioner (pipeline_split_mix.py) against brute force; the V-shaped placement bug of the old partitioner."""
from __future__ import annotations

import itertools
import random
import typing

import pytest
from conftest import TINY

from vlpretrain import layout_rules
from vlpretrain.config import ParallelConfig, load_config
from vlpretrain.data.step_mix import assumed_mix
from vlpretrain.parallel import pipeline, pipeline_cost, pipeline_split
from vlpretrain.parallel.mesh import resolve_layout
from vlpretrain.parallel.pipeline_split_mix import expected_step_time, partition_mix, resolve_layer_split


def test_config_names_every_schedule_in_the_table():
    names = typing.get_args(typing.get_type_hints(ParallelConfig)["schedule"])
    assert set(names) == set(layout_rules.SCHEDULES) == set(pipeline.SCHEDULES)


@pytest.mark.parametrize("schedule", list(layout_rules.SCHEDULES))
def test_partitioner_loads_equal_runtime_placement(schedule):
    """For every schedule: the rank loads the partitioner and predict plan are those of the stages the runtime
    (pipeline.stages_of_rank, Layout.stages_of_rank) places on each rank."""
    placement = layout_rules.SCHEDULES[schedule].placement
    pp, vpp = 2, (1 if placement == "single" else 2)
    cfg = load_config(TINY / "stage2.yaml", ["train.global_batch_size=16", "train.micro_batch_size=2",
                                             f"parallel.pp={pp}", f"parallel.vpp={vpp}",
                                             f"parallel.schedule={schedule}"])
    lay = resolve_layout(cfg, pp)
    costs = [pipeline_cost.PartCost(name=n, time_s=t, memory_bytes=0.0, flops=0.0)
             for n, t in zip(pipeline_split.part_names(4), [5.0, 1.0, 1.5, 2.0, 2.5, 2.0])]
    times = [c.time_s for c in costs]
    split = list(lay.split)
    runtime = [sum(sum(times[a:e]) for k, (a, e) in enumerate(pipeline_split.stage_bounds(split))
                   if k in pipeline.stages_of_rank(r, pp, vpp, schedule)) for r in range(pp)]
    assert [lay.stages_of_rank(r) for r in range(pp)] == [pipeline.stages_of_rank(r, pp, vpp, schedule)
                                                          for r in range(pp)]
    pred = pipeline_cost.predict(cfg, split, costs, lay.n_microbatches)
    assert pred["stage_time"] == pytest.approx(runtime)
    det = pipeline_split.partition_details(times, pp * vpp, pp, pipeline_split.stage_style(schedule))
    planned = [sum(sum(times[a:e]) for k, (a, e) in enumerate(pipeline_split.stage_bounds(det["split"]))
                   if layout_rules.rank_of_stage(k, pp, schedule) == r) for r in range(pp)]
    runtime = [sum(sum(times[a:e]) for k, (a, e) in enumerate(pipeline_split.stage_bounds(det["split"]))
                   if k in pipeline.stages_of_rank(r, pp, vpp, schedule)) for r in range(pp)]
    assert planned == pytest.approx(runtime) and max(runtime) == pytest.approx(det["value"])


def test_v_schedules_planned_as_v():
    """costs [5, 1 x 8, 2], pp=2, vpp=2: zbv runs stages 0 and 3 on rank 0. The old partitioner planned zbv as
    looped and picked [0, 3, 3, 2] (V loads 9 and 6); [0, 3, 4, 1] gives 8 and 7."""
    costs = [5.0] + [1.0] * 8 + [2.0]
    for schedule in ("zbv", "dualpipev"):
        assert pipeline_split.partition(costs, 4, 2, pipeline_split.stage_style(schedule)) == [0, 3, 4, 1]
        assert partition_mix([costs], [1.0], 4, 2, schedule, 8)["split"] == [0, 3, 4, 1]
    assert pipeline_split.partition(costs, 4, 2, pipeline_split.stage_style("interleaved_1f1b")) == [0, 3, 3, 2]


def _brute_mix(types, shares, v, pp, schedule, n_mb):
    n_parts = len(types[0])
    best = None
    for cuts in itertools.combinations(range(1, n_parts), v - 1):
        b = [0, *cuts, n_parts]
        split = [(b[k + 1] - b[k]) - (k == 0) - (k == v - 1) for k in range(v)]
        if layout_rules.split_problem(split, n_parts - 2, v):
            continue
        val = expected_step_time(split, types, shares, pp, schedule, n_mb)
        if best is None or val < best[0] * (1 - 1e-12):
            best = (val, split)
    return best


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b", "zbv", "zero_bubble"])
def test_partition_mix_matches_brute_force(schedule):
    rng = random.Random(hash(schedule) % 1000)
    single = layout_rules.SCHEDULES[schedule].placement == "single"
    for _ in range(25 if single else 12):
        pp = rng.randint(1, 3) if single else rng.randint(2, 3)
        v = pp if single else 2 * pp
        n_layers = rng.randint(max(v - 2, 1), 9)
        layers = [rng.uniform(0.5, 2.0) for _ in range(n_layers)]
        head = rng.uniform(0, 3)
        n_mb = rng.choice([pp, 2 * pp, 8 * pp])
        # text steps: almost no first stage; multimodal: a heavy one
        types = [[rng.uniform(0, 0.1), *layers, head], [rng.uniform(2, 8), *layers, head]]
        shares = [0.7, 0.3]
        det = partition_mix(types, shares, v, pp, schedule, n_mb)
        best_val, best_split = _brute_mix(types, shares, v, pp, schedule, n_mb)
        assert det["exact"]
        assert det["value"] == pytest.approx(best_val, rel=1e-9), (det, best_split)
        if single:  # ties: the fewest layers on the earliest stages
            assert det["split"] == best_split


def test_mix_aware_beats_max_of_expected_loads():
    """The expected step time is not the slowest rank's expected load: here balancing the mean costs puts 3
    layers on rank 0, which makes multimodal steps slow; the mix-aware split is never worse."""
    text = [0.0, 1, 1, 1, 1, 1, 1, 0.0]
    mm = [6.0, 1, 1, 1, 1, 1, 1, 0.0]
    shares = [0.7, 0.3]
    det = partition_mix([text, mm], shares, 2, 2, "1f1b", 8)
    mean = [0.7 * a + 0.3 * b for a, b in zip(text, mm)]
    for other in (pipeline_split.partition(costs, 2, 2) for costs in (mean, mm, text)):
        assert det["value"] <= expected_step_time(other, [text, mm], shares, 2, "1f1b", 8) + 1e-9


def test_assumed_mix_follows_the_config():
    cfg = load_config(TINY / "stage2.yaml", ["parallel.pp=2"])  # grouped, text + multimodal sources, end 0.7
    mix = assumed_mix(cfg)
    assert [(m.name, round(m.share, 6)) for m in mix] == [("text", 0.7), ("multimodal", 0.3)]
    assert mix[1].images == (cfg.train.micro_batch_size,)
    mixed = assumed_mix(load_config(TINY / "stage2.yaml", ["data.group_by_modality=false"]))
    assert [m.name for m in mixed] == ["mixed"] and 0 < mixed[0].mean_images < cfg.train.micro_batch_size
    # auto at start-up: the assumed mix; a text-heavy mix moves layers onto the first rank
    lay = resolve_layout(cfg, 2)
    assert list(lay.split) == resolve_layer_split(cfg, lay.n_microbatches, mix)


def test_measured_mix_reads_the_data_and_auto_uses_it(demo_dir):
    """``plan`` and training's ``auto`` sample the run's own planner: text steps carry no images, multimodal
    steps the images per microbatch of the packed rows, and the split is balanced over that mix."""
    from vlpretrain.config import load_config
    from vlpretrain.data.step_mix import measured_mix
    from vlpretrain.parallel.mesh import resolve_layout

    cfg = load_config(TINY / "stage2.yaml", [f"data.root={demo_dir}", "parallel.pp=2"])
    mix = measured_mix(cfg, steps=4)
    by_name = {t.name: t for t in mix}
    assert by_name["text"].share == pytest.approx(0.7) and by_name["text"].images == ()
    mm = by_name["multimodal"]
    assert mm.share == pytest.approx(0.3) and len(mm.images) == 4 * (16 // 8) and min(mm.images) > 0
    assert "measured" in mm.note
    layout = resolve_layout(cfg, 2, mix=mix)
    assert sum(layout.split) == cfg.model.n_layers
