"""Bad steps: a non-finite loss or gradient norm skips the update (counted, logged as strict JSON), too many in
a row stop the run with exit 43 without saving; no checkpoint with a non-finite tensor is ever published, and
``ckpt verify`` / ``--resume auto`` find one written without the check."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vlpretrain.checkpoint.dcp import (
    CHECKED_FINITE,
    TRAIN_STATE,
    Checkpointer,
    find_resumable,
    nonfinite_tensors,
    step_dirs,
    verify,
)
from vlpretrain.cli import main
from vlpretrain.errors import CheckpointError
from vlpretrain.train.bad_steps import EXIT_DIVERGED, BadStepPolicy, bad_step_reason
from vlpretrain.train.metrics import json_line
from vlpretrain.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _strict(text: str) -> list[dict]:
    def no(c):
        raise ValueError(f"not JSON: {c}")

    return [json.loads(line, parse_constant=no) for line in text.splitlines()]


def _finite_checkpoints(run_dir) -> list[str]:
    return [d.name for d in step_dirs(run_dir / "checkpoints") if not nonfinite_tensors(d)]



def _saved_state(ck: Path, name: str) -> dict:
    """Model and optimizer tensors of checkpoint ``ck/name``, read in one process."""
    from vlpretrain.checkpoint.integrity import SafeReader, load_dcp

    meta = SafeReader(str(ck / name)).read_metadata()
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
             if k.startswith(("model.", "optim.state.")) and hasattr(m, "size")}
    load_dcp(state, ck / name, no_dist=True)
    return state

def test_policy_and_reason():
    assert bad_step_reason(1.0, 2.0) is None
    assert bad_step_reason(float("nan"), 2.0) == "non-finite loss"
    assert bad_step_reason(1.0, float("inf")) == "non-finite grad norm"
    p = BadStepPolicy(2)
    assert [p.observe(r) for r in ("x", None, "x", "x")] == [False, False, False, True]
    assert (p.total, p.in_a_row) == (3, 2)
    assert _strict(json_line({"a": float("nan"), "b": [float("-inf"), 1.5], "c": {"d": float("inf")}})) == [
        {"a": None, "b": [None, 1.5], "c": {"d": None}}]


def test_divergence_repro_never_reaches_a_checkpoint(tiny_train_cfg, tmp_path, capsys):
    """The issue's repro: lr 1e4, no clipping, a checkpoint every step: from step 2 the gradient norm is NaN."""
    cfg = tiny_train_cfg(2, "train.lr=1e4", "train.warmup_steps=0", "train.grad_clip=1e30",
                         "checkpoint.interval=1", "checkpoint.keep_last=20", "train.steps=12",
                         "train.max_bad_steps=3")
    with pytest.raises(SystemExit) as e:
        train(cfg)
    assert e.value.code == EXIT_DIVERGED
    out = capsys.readouterr().out
    assert [x for x in out.splitlines() if x.startswith("diverged:")] and "Traceback" not in out
    run = tmp_path / "run"
    records = _strict((run / "metrics.jsonl").read_text())
    bad = [r for r in records if r.get("bad_step_reason")]
    assert len(bad) == 3 and records[-1]["bad_steps"] == 3 and records[-1]["step"] == bad[-1]["step"]
    dirs = step_dirs(run / "checkpoints")
    assert dirs and _finite_checkpoints(run) == [d.name for d in dirs]  # every one is finite
    assert all(verify(d, finite=True) is None for d in dirs)
    latest = (run / "checkpoints" / "latest").read_text()
    assert latest in [d.name for d in dirs] and int(latest[5:]) < records[-1]["step"]  # the bad state: not saved
    # the skipped updates left the weights as they were after the last good step
    assert json.loads((dirs[-1] / TRAIN_STATE).read_text())[CHECKED_FINITE] is True
    assert main(["ckpt", "verify", str(run)]) == 0


def test_poisoned_step_is_skipped_and_counted(tiny_train_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("VLP_FAULT", "nan_loss:2:0")
    cfg = tiny_train_cfg(2, "checkpoint.interval=1", "checkpoint.keep_last=5", "train.steps=3")
    summary = train(cfg)
    run = tmp_path / "run"
    records = _strict((run / "metrics.jsonl").read_text())
    assert [r.get("bad_step_reason") for r in records] == [None, "non-finite loss", None]
    assert [r["bad_steps"] for r in records] == [0, 1, 1] and records[1]["loss"] is None
    assert summary["final_loss"] == records[2]["loss"]
    # step 2 did not update: its checkpoint holds step 1's weights and optimizer state
    ck = run / "checkpoints"
    model_state = functools.partial(_saved_state, ck)

    one, two, three = (model_state(f"step_0000000{i}") for i in (1, 2, 3))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(two[k], three[k]) for k in two)


def test_max_bad_steps_exit_code_and_one_line(tiny_train_cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLP_FAULT", "nan_grad:2:0,nan_grad:3:0")
    with pytest.raises(SystemExit) as e:
        train(tiny_train_cfg(2, "checkpoint.interval=1", "train.steps=6", "train.max_bad_steps=2"))
    out = capsys.readouterr().out
    assert [x for x in out.splitlines() if x.startswith("diverged:")] == [
        "diverged: 2 bad steps in a row (non-finite grad norm at step 3; train.max_bad_steps=2); not saving; "
        "the last checkpoint is step_00000002; exiting with 43"]
    assert e.value.code == 43
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"  # step 2 skipped: step 1's state
    assert not (run / "checkpoints" / "step_00000003").exists()
    assert [r["step"] for r in _strict((run / "metrics.jsonl").read_text())] == [1, 2, 3]


def _tiny_ckpt(tmp_path, check: bool):
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    ck = Checkpointer(tmp_path / "checkpoints", [m], [opt], keep_last=3, is_main=True)
    ck.save(1, {"consumed_samples": 1, "data_state": {}})
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
    ck.check_finite = check
    return ck


def test_save_refuses_non_finite_weights(tmp_path):
    ck = _tiny_ckpt(tmp_path, check=True)
    with pytest.raises(CheckpointError, match="refusing to save step 2: 1 tensors hold non-finite values.*weight"):
        ck.save(2, {"consumed_samples": 2, "data_state": {}})
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000001"
    assert [d.name for d in step_dirs(tmp_path / "checkpoints")] == ["step_00000001"]
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))


def test_verify_and_resume_find_an_unchecked_non_finite_checkpoint(tmp_path, capsys):
    """A checkpoint saved without the check (older code, or train.check_finite false) that holds a NaN."""
    ck = _tiny_ckpt(tmp_path, check=False)
    ck.save(2, {"consumed_samples": 2, "data_state": {}})
    step2 = tmp_path / "checkpoints" / "step_00000002"
    assert json.loads((step2 / TRAIN_STATE).read_text())[CHECKED_FINITE] is False
    assert nonfinite_tensors(step2) == ["model.weight"]
    assert verify(step2, finite=False) is None  # files whole
    assert "1 tensors hold non-finite values, e.g. model.weight" in verify(step2)  # unchecked: scanned
    assert main(["ckpt", "verify", str(step2)]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert find_resumable(tmp_path / "checkpoints", "auto").name == "step_00000001"


@pytest.mark.multiprocess
def test_dp2_one_rank_sees_nan_every_rank_skips(demo_dir, tmp_path):
    """Only rank 1 sees a NaN loss at step 2: rank 0 (which writes the metrics) skips too, and the checkpoint
    of step 2 (every rank's shards) is step 1's state."""
    from test_resume import _train

    proc = _train(tmp_path, demo_dir, 2, "checkpoint.interval=1", "train.steps=3", "parallel.dp=2",
                  env_extra={"VLP_FAULT": "nan_loss:2:1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = _strict((tmp_path / "metrics.jsonl").read_text())
    assert [r.get("bad_step_reason") for r in records] == [None, "non-finite loss", None]
    ck = tmp_path / "checkpoints"
    names = ["step_00000001", "step_00000002", "step_00000003"]
    assert all(verify(ck / n, finite=True) is None for n in names)
    state = functools.partial(_saved_state, ck)

    one, two = state(names[0]), state(names[1])
    assert all(torch.equal(one[k], two[k]) for k in one)
