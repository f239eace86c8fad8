"""Faults a user makes at the command line, each one line on stderr and exit status 2 (or the right behaviour),
in-process through ``vlpretrain.cli.main``: a fresh start into a run dir that holds a run, a ``latest`` that is not
UTF-8, a weights file that is not safetensors, repeated ``--set`` options."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY

from vlpretrain.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(demo_dir: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(TINY / "stage1.yaml"), "--set", f"data.root={demo_dir}", f"train.run_dir={run}",
            "train.init_from=", "train.eval_file=", "train.eval_text=", "train.global_batch_size=8",
            "train.micro_batch_size=4", "train.seq_len=128", "logging.log_interval=1000", "train.steps=2", *extra]


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_repeated_set_options_all_count(demo_dir, tmp_path, capsys):
    # before: argparse kept the last --set only, so train.steps=abc was dropped silently
    args = build_parser().parse_args(["train", "-c", "x", "--set", "train.steps=abc", "--set", "train.run_dir=X",
                                      "train.lr=1"])
    assert args.overrides == ["train.steps=abc", "train.run_dir=X", "train.lr=1"]
    rc = main(["train", "--config", str(TINY / "stage1.yaml"), "--set", "train.steps=abc",
               "--set", f"train.run_dir={tmp_path / 'run'}"])
    assert rc == 2
    assert "train.steps" in _one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_latest_not_utf8_resumes_from_newest_good_checkpoint(demo_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(demo_dir, run, "checkpoint.interval=1")) == 0
    (run / "checkpoints" / "latest").write_bytes(b"\xff")
    capsys.readouterr()
    # before: UnicodeDecodeError traceback; after: a warning line, and the newest good checkpoint (step 2)
    assert main(_args(demo_dir, run, "train.steps=3", "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert "latest is damaged (not UTF-8 text)" in out and "resumed from" in out and "step_00000002" in out
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003"
    # as weights (eval --weights, init_from): one line naming the file and the fix
    (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe")
    rc = main(["eval", "--config", str(TINY / "stage3.yaml"), "--set", f"data.root={demo_dir}",
               "--weights", str(run / "checkpoints"), "--limit", "2"])
    assert rc == 2
    assert "not UTF-8" in _one_line(capsys)


def test_eval_weights_not_safetensors_is_one_line(demo_dir, tmp_path, capsys):
    bogus = tmp_path / "passwd"
    bogus.write_text("root:x:0:0:root:/root:/bin/bash\n")
    # before: a SafetensorError traceback (HeaderTooLarge)
    rc = main(["eval", "--config", str(TINY / "stage3.yaml"), "--set", f"data.root={demo_dir}",
               "--weights", str(bogus), "--limit", "2"])
    assert rc == 2
    line = _one_line(capsys)
    assert line.startswith("error: ") and "not a safetensors weights file" in line and str(bogus) in line


def test_fresh_start_refuses_a_run_dir_with_a_run(demo_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(demo_dir, run)) == 0
    metrics = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    # before: metrics.jsonl overwritten, latest moved back to the new run's step; after: one line, nothing touched
    assert main(_args(demo_dir, run, "train.steps=1")) == 2
    line = _one_line(capsys)
    assert "already holds a run (checkpoints up to step 2)" in line and "--resume auto" in line
    assert "checkpoint.overwrite=true" in line and "train.run_dir" in line
    assert (run / "metrics.jsonl").read_text() == metrics
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    assert not (run / ".lock").exists()
    # metrics without checkpoints (a run killed before its first save) count as a run too
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert main(_args(demo_dir, other)) == 2
    assert "already holds a run (metrics up to step 1, no checkpoint)" in _one_line(capsys)
    # resume and overwrite together contradict each other
    assert main(_args(demo_dir, run, "checkpoint.overwrite=true", "--resume", "auto")) == 2
    assert "checkpoint.overwrite" in _one_line(capsys)


def test_overwrite_moves_the_old_run_aside(demo_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(demo_dir, run)) == 0
    old_metrics = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(_args(demo_dir, run, "train.steps=1", "--overwrite")) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1, list(tmp_path.iterdir())
    assert "moved the previous run" in capsys.readouterr().err
    assert (aside[0] / "metrics.jsonl").read_text() == old_metrics  # the old run, whole
    assert (aside[0] / "checkpoints" / "latest").read_text() == "step_00000002"
    assert (aside[0] / "checkpoints" / "step_00000002").is_dir()
    assert (run / "checkpoints" / "latest").read_text() == "step_00000001"
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    # resuming is not refused
    assert main(_args(demo_dir, run, "train.steps=2", "--resume", "auto")) == 0
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"


def test_overwrite_moves_an_outside_checkpoint_dir_and_keeps_logs(tmp_path, capsys):
    from vlpretrain.train.rundir import move_previous_run_aside, previous_run

    run, ckpt = tmp_path / "run", tmp_path / "ckpts"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "rank_0.log").write_text("open by the launcher\n")
    (run / ".lock").write_text("{}")
    (ckpt / "step_00000004").mkdir(parents=True)
    assert previous_run(run, ckpt) == "checkpoints up to step 4"
    move_previous_run_aside(run, ckpt)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("ckpts.old-")]
    assert not ckpt.exists() and len(aside) == 1 and (aside[0] / "step_00000004").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]  # only logs and the lock: nothing
    assert (run / "logs" / "rank_0.log").is_file() and (run / ".lock").is_file()
    assert previous_run(run, ckpt) is None
    assert "moved the previous run" in capsys.readouterr().err
