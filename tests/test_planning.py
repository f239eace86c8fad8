"""The layout planner (``vlpretrain/planning``, ``plan --search``): cluster description, cost model,
search through ``resolve_layout``, the JSON / config / job it writes, and ``bench/plan_validation.py`` on a
CSV built here. Pure arithmetic on the meta device: no GPU, no data."""
from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import REPO

from vlpretrain.cli import main
from vlpretrain.config import ConfigError, load_config
from vlpretrain.data.step_mix import assumed_mix
from vlpretrain.errors import UserError
from vlpretrain.parallel.mesh import resolve_layout
from vlpretrain.planning.cluster import PRESETS, collective_s, get_cluster
from vlpretrain.planning.efficiency import load_table
from vlpretrain.planning.published import COLUMNS
from vlpretrain.planning.search import evaluate, search, with_layout

TINY = str(REPO / "configs/tiny/stage2.yaml")
BIG = str(REPO / "configs/deepseek-vl-7b/stage2.yaml")
BEST_KEYS = ("tp", "pp", "vpp", "dp", "micro_batch_size", "schedule", "activation_checkpointing", "layer_split",
             "step_time_s", "tokens_per_s_per_gpu", "mfu", "memory_gib")


def test_cluster_presets_overrides_and_yaml(tmp_path):
    assert {"a100-40gb", "a100-80gb", "h100-sxm", "h200"} <= set(PRESETS)
    cl = get_cluster("a100-40gb", gpus_per_node=4, peak_tflops=100.0)
    assert (cl.gpus_per_node, cl.peak_tflops, cl.mem_gib) == (4, 100.0, 40.0)
    f = tmp_path / "c.yaml"
    f.write_text("gpu: h200\ninter_gbps: 100\n")
    cl = get_cluster(cluster_file=str(f))
    assert (cl.gpu, cl.inter_gbps, cl.mem_gib) == ("h200", 100.0, 140.0)
    f.write_text("gpu: h200\nnics: 4\n")
    with pytest.raises(UserError, match="unknown key 'nics'"):
        get_cluster(cluster_file=str(f))
    with pytest.raises(UserError, match="unknown GPU"):
        get_cluster("tpu-v5")


def test_collectives_pay_the_network_across_nodes():
    cl = PRESETS["h100-sxm"]
    inside = collective_s("all_gather", 1e9, 8, cl, span=8)
    across = collective_s("all_gather", 1e9, 8, cl, span=64)
    assert across > 5 * inside
    assert collective_s("all_reduce", 1e9, 8, cl, 8) == pytest.approx(2 * inside)
    assert collective_s("all_gather", 1e9, 1, cl, 1) == 0.0


def _eval(cfg, world, gpu="a100-80gb", **layout):
    c = with_layout(cfg, **layout)
    return evaluate(c, world, get_cluster(gpu), assumed_mix(c))


def test_fsdp_shards_states_over_dp_and_schedules_shrink_the_bubble():
    cfg = load_config(BIG)
    base = dict(tp=1, pp=1, vpp=1, schedule="1f1b", layer_split="uniform")
    one = _eval(cfg, 1, dp=1, **base)
    eight = _eval(cfg, 8, dp=8, **base)
    sixteen = _eval(cfg, 16, dp=16, **base)
    # parameters, grads and AdamW states: 16 bytes/parameter unsharded, / dp under FSDP
    assert one["memory_parts_gib"]["states"] > 80  # a 7B cannot train on one 80 GiB GPU
    assert eight["memory_parts_gib"]["states"] == pytest.approx(one["memory_parts_gib"]["states"] / 8, rel=1e-6)
    assert sixteen["memory_parts_gib"]["states"] == pytest.approx(eight["memory_parts_gib"]["states"] / 2, rel=1e-6)
    assert one["fsdp_exposed_s"] == 0 < eight["fsdp_exposed_s"]
    pp = dict(tp=1, pp=4, dp=2, layer_split="uniform")
    plain = _eval(cfg, 8, vpp=1, schedule="1f1b", **pp)
    inter = _eval(cfg, 8, vpp=2, schedule="interleaved_1f1b", **pp)
    assert 0 < inter["bubble_s"] < plain["bubble_s"]
    tp = _eval(cfg, 8, tp=8, pp=1, vpp=1, dp=1, schedule="1f1b", layer_split="uniform")
    # the decoder and head are split over tp; the first stage (vision towers, token embedding) is replicated
    assert tp["tp_comm_s"] > 0 and tp["memory_parts_gib"]["states"] < one["memory_parts_gib"]["states"] / 4


def test_search_7b_on_8_gpus_fits_memory_and_resolve_layout_accepts_it():
    cfg = load_config(BIG)
    cl = get_cluster("a100-40gb")
    res = search(cfg, 8, cl, top=3)
    best = res["best"]
    assert all(k in best for k in BEST_KEYS)
    assert best["memory_gib"] <= cl.mem_gib
    assert all(row["memory_gib"] <= cl.mem_gib for row in res["top"])
    assert [r["step_time_s"] for r in res["top"]] == sorted(r["step_time_s"] for r in res["top"])
    lay = resolve_layout(res["best_config"], 8)
    assert (lay.tp, lay.pp, lay.vpp, lay.dp, list(lay.split)) == (best["tp"], best["pp"], best["vpp"], best["dp"],
                                                                  best["layer_split"])
    assert res["out_of_memory"] > 0  # e.g. every unsharded-enough layout of a 7B on 40 GiB
    with pytest.raises(ConfigError, match="no layout of 1 GPUs fits"):
        search(cfg, 1, dataclasses.replace(cl, mem_gib=10.0))


def test_cli_search_json_write_config_and_sbatch(tmp_path, capsys):
    out_cfg, job = tmp_path / "best.yaml", tmp_path / "best.sbatch"
    rc = main(["plan", "--config", TINY, "--search", "--world-size", "8", "--gpus-per-node", "4", "--json",
               "--write-config", str(out_cfg), "--write-sbatch", str(job)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    best = res["best"]
    assert all(k in best for k in BEST_KEYS)
    written = load_config(str(out_cfg))  # validates
    lay = resolve_layout(written, 8)
    assert (lay.tp, lay.pp, lay.vpp, lay.dp, list(lay.split), written.train.micro_batch_size) == (
        best["tp"], best["pp"], best["vpp"], best["dp"], best["layer_split"], best["micro_batch_size"])
    text = job.read_text()
    assert "#SBATCH --nodes=2" in text and str(out_cfg) in text and "launch/slurm/train.sbatch" in text
    rc = main(["plan", "--config", TINY, "--search"])
    assert rc == 2 and "--world-size" in capsys.readouterr().err
    # the config's own layout, evaluated by the same model (the written one: the search's best)
    assert main(["plan", "--config", str(out_cfg), "--evaluate", "--world-size", "8", "--gpus-per-node", "4",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["step_time_s"] == pytest.approx(best["step_time_s"], rel=1e-9)


def _row(**kw) -> dict:
    base = dict.fromkeys(COLUMNS, "")
    base.update(source="test", model="LM-1b", arch="llama", layers="16", hidden="2048", ffn="5632", heads="16",
                kv_heads="16", vocab="32000", seq_len="2048", gpu="H100-80GB", gpus="16", precision="bf16",
                global_batch_seqs="256", micro_batch="4", tp="1", pp="1", cp="1", dp="16", fsdp="yes",
                activation_checkpointing="no", tokens_per_s_per_gpu="20000")
    base.update(kw)
    return base


def test_plan_validation_on_a_small_csv(tmp_path):
    rows = [_row(), _row(tp="2", pp="2", dp="4", vpp="2", fsdp="no", memory_gib_per_gpu="30"),
            _row(cp="2", dp="8"), _row(precision="fp8"), _row(tokens_per_s_per_gpu=""), _row(arch="vlm")]
    path = tmp_path / "runs.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    proc = subprocess.run([sys.executable, str(REPO / "bench/plan_validation.py"), "--csv", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["rows_evaluated"] == 2 and summary["rows_skipped"] == 4
    assert summary["rows_held_out"] == 2 and summary["memory_rows"] == 1
    for key in ("tokens_per_s_median_abs_rel_err", "tokens_per_s_within_25pct", "memory_within_20pct"):
        assert 0 <= summary[key] <= 10
    text = "\n".join(out)
    assert "context parallelism" in text and "precision fp8" in text and "no tokens/s" in text
    bad = tmp_path / "bad.csv"
    bad.write_text("model,gpu\nx,y\n")
    proc = subprocess.run([sys.executable, str(REPO / "bench/plan_validation.py"), "--csv", str(bad), "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "missing column" in proc.stderr


def test_fitted_table_names_its_rows():
    table = load_table()
    fit = {r["key"] for r in table["fit_rows"]}
    held = {r["key"] for r in table["held_out_rows"]}
    assert fit and held and not fit & held
    assert table["fitted_by"] == "bench/fit_planner.py" and len(table["csv_sha256"]) == 64
    for fam in ("a100", "h100"):
        row = table["families"][fam]
        assert row["widths"] == sorted(row["widths"]) and all(0.05 < e <= 1.0 for e in row["efficiency"])


def test_paper_scale_plan_of_the_1_3b_adds_up():
    sys.path.insert(0, str(REPO / "bench"))
    from paper_scale_plan import plan_model

    out = plan_model("deepseek-vl-1.3b", 128, "a100-80gb")
    assert [s["stage"] for s in out["stages"]] == [1, 2, 3] and out["paper_days"] == 7.0
    for s in out["stages"]:
        assert s["days"] == pytest.approx(s["steps"] * s["step_time_s"] / 86400, abs=0.01)
        assert s["memory_gib"] <= 80
    assert out["total_days"] == pytest.approx(sum(s["days"] for s in out["stages"]), abs=0.02)


def test_hsdp_shard_groups_trade_memory_for_network_traffic():
    """``dp_shard`` (HSDP, modelled ahead of the engine's key): node-sized shard groups gather over NVLink and
    all-reduce gradient shards across replicas; states are sharded over the group only."""
    from vlpretrain.planning.cost import LayoutSpec, estimate
    from vlpretrain.planning.published import row_parts

    parts, per_seq = row_parts(_row(layers="32", hidden="4096", ffn="11008", heads="32", kv_heads="32"), 1, 1, False)
    cl = PRESETS["h100-sxm"]
    base = dict(tp=1, pp=1, vpp=1, dp=64, schedule="1f1b", n_microbatches=4, split=(32,), boundary_bytes=0.0)
    full = estimate(parts, LayoutSpec(**base), cl, lambda w: 0.5, 256 * 2048, 256 * per_seq)
    hsdp = estimate(parts, LayoutSpec(**base, dp_shard=8), cl, lambda w: 0.5, 256 * 2048, 256 * per_seq)
    assert hsdp["fsdp_exposed_s"] < full["fsdp_exposed_s"]
    assert hsdp["memory_parts_gib"]["states"] == pytest.approx(8 * full["memory_parts_gib"]["states"])
