"""After a bad step: loss spikes per modality, the step's samples in ``bad_steps.jsonl`` (the blamed ones found by
re-running the step's rows), ``train.on_bad_step`` skip / rollback / stop, and the rollback's exact replay: a run
that met a poisoned sample ends with the weights of a run that never drew it."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.test_bad_steps import _saved_state, _strict
from vlpretrain.data.step_plan import StepPlanner
from vlpretrain.data.tokenizer import TextTokenizer
from vlpretrain.train.bad_steps import DIVERGED_MARKER, BadStepPolicy, LossHistory, offending_rows
from vlpretrain.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_spike_rule_per_modality_and_state():
    h = LossHistory(factor=2.0, window=4)
    for x in (3.0, 3.2):
        assert not h.is_spike("text", 100.0)  # under half a window known: no limit yet
        h.add("text", x)
    assert h.limit("text") == pytest.approx(6.2) and h.is_spike("text", 6.3) and not h.is_spike("text", 6.1)
    assert h.limit("multimodal") is None  # its own history
    for x in (1.0, 1.0, 1.0, 1.0, 1.0):
        h.add("text", x)  # the window slides: the old level is forgotten
    assert h.limit("text") == 2.0
    h2 = LossHistory(2.0, 4)
    h2.load_state_dict(json.loads(json.dumps(h.state_dict())))
    assert h2.limit("text") == 2.0 and len(h2.losses["text"]) == 4
    assert LossHistory(0.0, 4).limit("text") is None  # factor 0: off


def test_policy_counts_replays_as_no_progress():
    p = BadStepPolicy(3)
    assert not p.observe("x", 5)  # bad step 5, then a rollback replays 3, 4 (good) and 5 is bad again
    assert not p.observe(None, 3) and not p.observe(None, 4) and p.in_a_row == 1
    assert not p.observe("x", 5) and p.observe("x", 5)  # three bad in a row with no step past 5
    q = BadStepPolicy(3)
    q.observe("x", 5)
    q.observe(None, 6)  # a step after the last bad one ends the row
    assert q.in_a_row == 0 and q.total == 1
    assert BadStepPolicy(3).state_dict()["total"] == 0


def test_blamed_rows():
    assert offending_rows([1.0, float("nan"), 2.0], None) == [1]
    assert offending_rows([1.0, 9.0, 2.0], 5.0) == [1]
    assert offending_rows([1.0, 2.0], None) == [0, 1]  # none stands out: the whole step


def _sample_first_drawn_at(cfg, step: int) -> tuple[str, int]:
    """A sample the run draws first at ``step`` (not before it)."""
    planner = StepPlanner(cfg, TextTokenizer(f"{cfg.data.root}/{cfg.data.tokenizer}"))
    seen = set()
    for _ in range(step - 1):
        seen |= {(int(s), int(i)) for s, i in planner.plan().table[:, :2].tolist()}
    table = planner.plan().table
    s, i = next((int(s), int(i)) for s, i in table[:, :2].tolist() if (int(s), int(i)) not in seen)
    assert int(table[[k for k in range(len(table)) if table[k, 0] == s and table[k, 1] == i][0], 4]) > 0  # images
    return planner.sources[s].name, i


def test_rollback_replays_exactly_without_the_poisoned_sample(tiny_train_cfg, tmp_path, monkeypatch, capsys):
    # bitwise replay needs every forward value to be a function of the step alone: a frozen tower's cached output
    # was computed in whichever batch first held its image (docs/training.md#work-a-step-skips), so it is off here
    common = ("train.steps=8", "checkpoint.interval=2", "checkpoint.keep_last=10", "train.frozen_tower_cache_mb=0")
    name, index = _sample_first_drawn_at(tiny_train_cfg(3, *common), 5)
    monkeypatch.setenv("VLP_FAULT", f"nan_sample:{name}:{index}")
    poisoned = train(tiny_train_cfg(3, *common, "train.on_bad_step=rollback", run="poisoned"))
    out = capsys.readouterr().out
    assert "bad step 5 (non-finite loss): rolled back to step 4" in out and "Traceback" not in out
    monkeypatch.delenv("VLP_FAULT")
    clean = train(tiny_train_cfg(3, *common, f"data.skip_samples=[{name}:{index}]", run="clean"))

    run = tmp_path / "poisoned"
    (record,) = _strict((run / "bad_steps.jsonl").read_text())
    assert (record["step"], record["reason"], record["action"]) == (5, "non-finite loss", "rollback")
    blamed = [s for s in record["samples"] if s["blamed"]]
    assert [(s["source"], s["index"]) for s in blamed] == [(name, index)]  # one sample per row: only it
    assert math.isnan(blamed[0]["row_loss"]) if blamed[0]["row_loss"] is not None else True
    assert all(s["row_loss"] is not None for s in record["samples"] if not s["blamed"])
    assert {"key", "tokens", "images", "modality"} <= set(blamed[0])
    # the replay logged steps 5..8 again: one line per step, as in the clean run, with the same losses
    metrics = _strict((run / "metrics.jsonl").read_text())
    clean_metrics = _strict((tmp_path / "clean" / "metrics.jsonl").read_text())
    assert [r["step"] for r in metrics] == list(range(1, 9))
    assert [r["loss"] for r in metrics] == [r["loss"] for r in clean_metrics]
    assert [r["samples_digest"] for r in metrics] == [r["samples_digest"] for r in clean_metrics]
    assert poisoned["final_loss"] == clean["final_loss"] and poisoned["bad_steps"] == 1
    a = _saved_state(run / "checkpoints", "step_00000008")
    b = _saved_state(tmp_path / "clean" / "checkpoints", "step_00000008")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # weights and optimizer: bitwise
    state = json.loads((run / "checkpoints" / "step_00000008" / "train_state.json").read_text())
    assert state["progress"]["excluded"] == [[name, index]] and state["progress"]["bad_steps"]["rollbacks"] == [4]
    assert state["data_state"]["sources"][name]["excluded"] == [index]  # by name: it survives a layout change

    # stopped after the rollback (step 6) and resumed, the fault still armed: the same weights at step 8
    monkeypatch.setenv("VLP_FAULT", f"nan_sample:{name}:{index}")
    short = ("train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=10", "train.on_bad_step=rollback",
             "train.frozen_tower_cache_mb=0")
    train(tiny_train_cfg(3, *short, run="resumed"))
    train(tiny_train_cfg(3, *common, "train.on_bad_step=rollback", "checkpoint.resume=auto", run="resumed"))
    c = _saved_state(tmp_path / "resumed" / "checkpoints", "step_00000008")
    assert all(torch.equal(c[k], b[k]) for k in b)


def test_loss_spikes_are_bad_steps_until_the_run_stops(tiny_train_cfg, tmp_path, capsys):
    """A factor under 1 makes every step after half a window a spike: counted, recorded, then the run stops."""
    with pytest.raises(SystemExit) as e:
        train(tiny_train_cfg(1, "train.steps=10", "train.spike_factor=0.5", "train.spike_window=4",
                             "train.max_bad_steps=3"))
    assert e.value.code == 43
    run = tmp_path / "run"
    records = _strict((run / "bad_steps.jsonl").read_text())
    assert [r["step"] for r in records] == [3, 4, 5] and {r["reason"] for r in records} == {"loss spike"}
    assert [r["action"] for r in records] == ["skip", "skip", "stop"]
    assert all(r["spike_limit"] is not None and r["loss"] > r["spike_limit"] for r in records)
    assert all(any(s["blamed"] for s in r["samples"]) for r in records)
    out = capsys.readouterr().out
    assert "diverged: 3 bad steps in a row (loss spike at step 5; train.max_bad_steps=3)" in out
    assert json.loads((run / DIVERGED_MARKER).read_text())["step"] == 5


def test_on_bad_step_stop_and_no_retry_by_torchrun(tiny_train_cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLP_FAULT", "nan_loss:2:0")
    cfg = tiny_train_cfg(2, "train.steps=4", "train.on_bad_step=stop", "checkpoint.interval=1")
    with pytest.raises(SystemExit) as e:
        train(cfg)
    assert e.value.code == 43
    assert "diverged: bad step 2 (non-finite loss; train.on_bad_step=stop); not saving; the last checkpoint is " \
           "step_00000001; exiting with 43" in capsys.readouterr().out
    run = tmp_path / "run"
    assert [r["action"] for r in _strict((run / "bad_steps.jsonl").read_text())] == ["stop"]
    # torchrun --max-restarts restarting the ranks: refused at once, nothing touched
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(SystemExit) as e:
        train(tiny_train_cfg(2, "train.steps=4", "checkpoint.resume=auto"))
    assert e.value.code == 43 and "not retrying: this run diverged" in capsys.readouterr().out
    # started again by hand (after lowering what diverged): runs, and the marker is gone
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    monkeypatch.delenv("VLP_FAULT")
    assert train(tiny_train_cfg(2, "train.steps=3", "checkpoint.resume=auto"))["steps"] == 3
    assert not (run / DIVERGED_MARKER).exists()


def test_refused_save_during_training_exits_43(tiny_train_cfg, tmp_path, monkeypatch, capsys):
    """Non-finite weights that no check caught (here: planted after step 1) never become a checkpoint."""
    from vlpretrain.train import trainer

    real = trainer._train_step

    def plant(run, step):
        got = real(run, step)
        if step == 1:
            with torch.no_grad():
                next(p for p in run.model.modules[0].parameters() if p.requires_grad).view(-1)[0] = float("inf")
        return got

    monkeypatch.setattr(trainer, "_train_step", plant)
    with pytest.raises(SystemExit) as e:
        train(tiny_train_cfg(2, "train.steps=3", "checkpoint.interval=1"))
    assert e.value.code == 43
    out = capsys.readouterr().out
    assert "diverged: refusing to save step 1: 1 tensors hold non-finite values on rank 0" in out
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_vanished_gradients_are_named(tiny_train_cfg, capsys):
    """The issue's stage 1 at lr 1e4: the gradient norm falls from 2.6 to ~1e-6 and stays there, the loss flat."""
    train(tiny_train_cfg(1, "train.steps=6", "train.lr=1e4", "train.warmup_steps=0"))
    lines = [x for x in capsys.readouterr().out.splitlines() if "gradient norm has vanished" in x]
    assert len(lines) == 1 and "steps 2-4" in lines[0] and "train.lr=10000.0" in lines[0]
    train(tiny_train_cfg(1, "train.steps=6", run="sane"))
    assert "vanished" not in capsys.readouterr().out


def test_dp2_rollback_equals_a_clean_run(demo_dir, tmp_path):
    """Two ranks, each scoring its own rows: the blamed sample is found on whichever rank holds it, every rank
    rolls back alike, and the weights equal a clean two-rank run's."""
    from test_resume import TINY, _train

    from vlpretrain.config import load_config

    sets = ("train.steps=6", "data.language_ratio.start=0.5", "data.language_ratio.end=0.5")
    cfg = load_config(TINY / "stage2.yaml", [f"data.root={demo_dir}", "train.global_batch_size=8",
                                             "train.seq_len=128", "data.packing=false", *sets])
    step = next(s for s in range(3, 7) if StepPlanner(cfg, TextTokenizer(f"{demo_dir}/{cfg.data.tokenizer}"))
                .planner.modality(s) == "multimodal")
    name, index = _sample_first_drawn_at(cfg, step)
    poisoned = _train(tmp_path / "poisoned", demo_dir, 2, *sets, "parallel.dp=2", "train.on_bad_step=rollback",
                      env_extra={"VLP_FAULT": f"nan_sample:{name}:{index}"})
    assert poisoned.returncode == 0, poisoned.stdout[-2000:] + poisoned.stderr[-3000:]
    assert f"bad step {step} (non-finite loss): rolled back to step {(step - 1) // 2 * 2}" in poisoned.stdout
    clean = _train(tmp_path / "clean", demo_dir, 2, *sets, "parallel.dp=2", f"data.skip_samples=[{name}:{index}]")
    assert clean.returncode == 0, clean.stdout[-2000:] + clean.stderr[-3000:]
    (record,) = _strict((tmp_path / "poisoned" / "bad_steps.jsonl").read_text())
    assert [(s["source"], s["index"]) for s in record["samples"] if s["blamed"]] == [(name, index)]
    assert len(record["samples"]) == 8  # both ranks' rows
    a = _saved_state(tmp_path / "poisoned" / "checkpoints", "step_00000006")
    b = _saved_state(tmp_path / "clean" / "checkpoints", "step_00000006")
    assert all(torch.equal(a[k], b[k]) for k in a)
