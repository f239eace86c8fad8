"""Faults a user makes at the command line, each one line on stderr and exit status 2 (or the right behaviour),
in-process through ``vlpretrain.cli.main``: a ``latest`` that is not UTF-8, a weights file that is not
safetensors, repeated ``--set`` options."""
from __future__ import annotations

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
