"""Checkpoints and resume (DCP): bitwise on one process and in (2, 2, 2), across layouts under torchrun (also
from HSDP), after SIGTERM (save and exit 42) and after a SIGKILLed rank with torchrun restarts; damaged
checkpoints fall back to the previous one; init_from across layouts; the ckpt CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY
from safetensors.torch import load_file

from vlpretrain.checkpoint.dcp import find_resumable, verify

STEPS = 4


def _train(run_dir: Path, demo_dir: Path, nproc: int = 1, *overrides: str, resume: bool = False,
           env_extra: dict | None = None, restarts: int = 0) -> subprocess.CompletedProcess:
    sets = [f"data.root={demo_dir}", f"train.run_dir={run_dir}", "train.init_from=", "train.eval_file=",
            f"train.steps={STEPS}", "checkpoint.interval=2", "checkpoint.keep_last=5", "train.global_batch_size=8",
            "train.micro_batch_size=2", "train.seq_len=128", "data.packing=false", "train.warmup_steps=1",
            "data.language_ratio.start=0.5", "data.language_ratio.end=0.5", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    cmd = [sys.executable, "-m", "vlpretrain"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               f"--max-restarts={restarts}", "-m", "vlpretrain"]
    cmd += ["train", "--config", str(TINY / "stage2.yaml"), "--set", *sets] + (["--resume", "auto"] if resume else [])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _resume_copy(src: Path, dst: Path, step: int) -> None:
    """A run dir holding only ``src``'s checkpoint of ``step``: the run was interrupted right after it."""
    (dst / "checkpoints").mkdir(parents=True)
    name = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    (dst / "checkpoints" / "latest").write_text(name)


@pytest.fixture(scope="module")
def reference(demo_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference")
    proc = _train(run, demo_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, _metrics(run)


def test_single_process_resume_is_bitwise(reference, demo_dir, tmp_path):
    ref_dir, ref = reference
    assert {r["modality"] for r in ref.values()} == {"text", "multimodal"}
    _resume_copy(ref_dir, tmp_path, 2)
    proc = _train(tmp_path, demo_dir, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    got = _metrics(tmp_path)
    assert sorted(got) == [3, 4]
    for s in (3, 4):  # same layout on CPU: bit for bit
        assert got[s]["loss"] == ref[s]["loss"] and got[s]["grad_norm"] == ref[s]["grad_norm"]
        assert got[s]["samples_digest"] == ref[s]["samples_digest"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_async_save_resumes_bitwise(reference, demo_dir, tmp_path, nproc):
    """Interval checkpoints written in the background (checkpoint.async_save) resume like synchronous ones."""
    _, ref = reference
    layout = ["parallel.dp=2"] if nproc == 2 else []
    src = tmp_path / "src"
    proc = _train(src, demo_dir, nproc, "checkpoint.async_save=true", *layout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (src / "checkpoints" / "step_00000002" / "train_state.json").is_file()
    dst = tmp_path / "dst"
    _resume_copy(src, dst, 2)
    proc = _train(dst, demo_dir, nproc, *layout, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for s in (3, 4):
        assert _metrics(dst)[s]["loss"] == _metrics(src)[s]["loss"]
        if nproc == 1:
            assert _metrics(dst)[s]["loss"] == ref[s]["loss"]


def test_resume_across_layouts(demo_dir, tmp_path):
    """Saved by (dp, tp, pp) = (2, 2, 2) with SP, resumed in (1, 2, 1), (2, 1, 2) and (4, 1, 1)."""
    src = tmp_path / "src"
    proc = _train(src, demo_dir, 8, "parallel.dp=2", "parallel.tp=2", "parallel.pp=2",
                  "parallel.sequence_parallel=true", "parallel.layer_split=[1,3]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = _metrics(src)
    assert json.loads((src / "checkpoints/step_00000002/train_state.json").read_text())["layout"] == [2, 2, 2, 1]
    for name, nproc, layout in [("tp2", 2, ["parallel.tp=2"]),
                                ("dp2_pp2", 4, ["parallel.dp=2", "parallel.pp=2", "parallel.layer_split=[2,2]"]),
                                ("dp4", 4, ["parallel.dp=4"])]:
        dst = tmp_path / name
        _resume_copy(src, dst, 2)
        proc = _train(dst, demo_dir, nproc, *layout, resume=True)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        got = _metrics(dst)
        for s in (3, 4):
            assert got[s]["samples_digest"] == ref[s]["samples_digest"], name
            # fp32 sums in another order, amplified by Adam's first steps: 1e-5 relative
            assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), (name, s)
            print(f"resume (2,2,2) -> {name}: step {s} |loss diff| = {abs(got[s]['loss'] - ref[s]['loss']):.2e}")


def test_hsdp_matches_one_process_and_resumes_across_layouts(reference, demo_dir, tmp_path):
    """HSDP (dp=4, dp_shard=2: two replicas of 2-way shards) trains like one process, writes the same full
    weights, and its checkpoint resumes in plain FSDP (dp=2), one process and pure replication (dp_shard=1)."""
    ref_dir, ref = reference
    src = tmp_path / "src"
    proc = _train(src, demo_dir, 4, "parallel.dp=4", "parallel.dp_shard=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _metrics(src)
    for s in range(1, STEPS + 1):  # the same data, the same losses as one process (fp32 sums in another order)
        assert got[s]["samples_digest"] == ref[s]["samples_digest"]
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), s
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), s
    # every region of the full weights written once, by the right replica (nothing left zero or stale): equal to
    # one process's but for a few isolated elements, where a near-zero gradient summed in another order turns
    # Adam's normalised update (up to lr per step) another way; a missing or stale shard is a whole region
    weights = f"checkpoints/step_{STEPS:08d}/model.safetensors"
    mine, theirs = load_file(str(src / weights)), load_file(str(ref_dir / weights))
    assert mine.keys() == theirs.keys()
    lr = float(yaml.safe_load((ref_dir / "config.yaml").read_text())["train"]["lr"])
    for k in theirs:
        diff = (mine[k] - theirs[k]).abs()
        assert int((diff > 1e-4).sum()) <= max(2, diff.numel() // 1000), k
        assert float(diff.max()) <= STEPS * lr, k
    for name, nproc, layout in [("dp2", 2, ["parallel.dp=2"]), ("one_process", 1, []),
                                ("dp4_shard1", 4, ["parallel.dp=4", "parallel.dp_shard=1"])]:
        dst = tmp_path / name
        _resume_copy(src, dst, 2)
        proc = _train(dst, demo_dir, nproc, *layout, resume=True)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        assert "resumed from" in proc.stdout, name
        resumed = _metrics(dst)
        for s in (3, 4):
            assert resumed[s]["samples_digest"] == got[s]["samples_digest"], name
            assert resumed[s]["loss"] == pytest.approx(got[s]["loss"], rel=1e-5), (name, s)
            print(f"resume hsdp (dp 4, shard 2) -> {name}: step {s} |loss diff| = "
                  f"{abs(resumed[s]['loss'] - got[s]['loss']):.2e}")


def test_resume_in_the_same_3d_layout_is_bitwise(demo_dir, tmp_path):
    layout = ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true",
              "parallel.layer_split=[1,3]"]
    src = tmp_path / "src"
    proc = _train(src, demo_dir, 8, *layout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dst = tmp_path / "dst"
    _resume_copy(src, dst, 2)
    proc = _train(dst, demo_dir, 8, *layout, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = _metrics(src), _metrics(dst)
    for s in (3, 4):
        assert got[s]["loss"] == ref[s]["loss"] and got[s]["grad_norm"] == ref[s]["grad_norm"], s


def test_init_from_across_layouts(reference, demo_dir, tmp_path):
    """Stage 3 from the (single-process) stage-2 weights: a pp=2 run and a one-process run start equal."""
    ref_dir, _ = reference
    one, two = tmp_path / "one", tmp_path / "two"
    stage3 = ["train.stage=3", f"train.init_from={ref_dir}", "train.steps=1"]
    assert _train(one, demo_dir, 1, *stage3).returncode == 0
    proc = _train(two, demo_dir, 2, *stage3, "parallel.pp=2", "parallel.layer_split=[2,2]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _metrics(two)[1]["loss"] == pytest.approx(_metrics(one)[1]["loss"], rel=1e-6)


def test_sigterm_saves_and_exits_then_resumes(reference, demo_dir, tmp_path):
    _, ref = reference
    proc = _train(tmp_path, demo_dir, 2, "parallel.dp=2", env_extra={"VLP_FAULT": "term:3:1"})
    assert proc.returncode != 0 and "exiting with 42" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000003"  # saved at the end of step 3
    proc = _train(tmp_path, demo_dir, 2, "parallel.dp=2", resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _metrics(tmp_path)
    assert sorted(got) == [1, 2, 3, 4]
    for s in (1, 2, 3, 4):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5)
        assert got[s]["samples_digest"] == ref[s]["samples_digest"]


def test_sigkill_rank_then_torchrun_restart(reference, demo_dir, tmp_path):
    """Rank 1 dies mid-step 3 (SIGKILL); torchrun restarts the job, which resumes from step 2 and finishes."""
    _, ref = reference
    proc = _train(tmp_path, demo_dir, 2, "parallel.pp=2", "parallel.layer_split=[2,2]", resume=True,
                  env_extra={"VLP_FAULT": "kill:3:1"}, restarts=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "exitcode: -9" in proc.stderr  # the kill happened
    got = _metrics(tmp_path)
    assert sorted(got) == [1, 2, 3, 4]  # step 3 never finished in the first attempt: no duplicate line
    for s in (1, 2, 3, 4):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5)
        assert got[s]["samples_digest"] == ref[s]["samples_digest"]


def test_damaged_latest_falls_back(reference, tmp_path):
    ref_dir, _ = reference
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(ref_dir / "checkpoints", ckpts)
    assert find_resumable(ckpts, "auto").name == "step_00000004"
    shard = next((ckpts / "step_00000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated by a crash
    assert "truncated" in verify(ckpts / "step_00000004")
    assert find_resumable(ckpts, "auto").name == "step_00000002"
    (ckpts / "step_00000002" / "train_state.json").unlink()
    assert find_resumable(ckpts, "auto") is None
    with pytest.raises(FileNotFoundError, match="no usable checkpoint"):
        find_resumable(tmp_path, str(ckpts))


def test_ckpt_cli_inspect_export_import(reference, tmp_path, capsys):
    from vlpretrain.cli import main

    ref_dir, _ = reference
    assert main(["ckpt", "inspect", str(ref_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == STEPS and info["problem"] is None and info["layout"] == {"dp": 1, "tp": 1, "pp": 1, "vpp": 1}
    assert info["full_weights"] and info["tensors"] > 0 and info["optimizer_entries"] > 0
    out = tmp_path / "dsvl"
    assert main(["ckpt", "export", str(ref_dir), "--config", str(TINY / "stage2.yaml"), "--format", "deepseek-vl",
                 "--out", str(out)]) == 2  # tiny towers: their code cannot build them
    assert main(["ckpt", "export", str(ref_dir), "--config", str(TINY / "stage2.yaml"), "--format", "deepseek-vl",
                 "--out", str(out), "--allow-nonrelease"]) == 0
    assert main(["ckpt", "import", str(out), "--out", str(tmp_path / "imported")]) == 0
    capsys.readouterr()
    back = load_file(str(tmp_path / "imported" / "step_00000000" / "model.safetensors"))
    orig = load_file(str(ref_dir / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"))
    assert back.keys() == orig.keys() and all(torch.equal(back[k], orig[k]) for k in orig)
