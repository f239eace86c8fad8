"""Faults around a run: Ctrl-C, deadlines, two jobs in one run dir, resumes that rewind, runs with nothing left
to do. Each fires through the ``faults`` hook (once per job) or the run dir itself."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

from test_resume import _metrics, _train


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_sigint_saves_resume_rewinds_metrics_and_nothing_left(demo_dir, tmp_path):
    # a first Ctrl-C during step 3: the step finishes, is saved, the job exits 42 and says so in the run dir
    proc = _train(tmp_path, demo_dir, 1, env_extra={"VLP_FAULT": "int:3:0"})
    assert proc.returncode == 42, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000003"
    assert json.loads((tmp_path / "preempted").read_text())["reason"] == "SIGINT"
    assert sorted(_metrics(tmp_path)) == [1, 2, 3]
    first = _metrics(tmp_path)
    # lose step 3's checkpoint: the resumed run goes back to step 2 and logs step 3 again, once
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000003")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002")
    proc = _train(tmp_path, demo_dir, 1, resume=True, env_extra={"VLP_FAULT": "int:3:0"})  # fired already
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "preempted").exists() and not (tmp_path / ".lock").exists()
    lines = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3, 4]
    assert _metrics(tmp_path)[3]["loss"] == first[3]["loss"]
    # train.steps below the checkpoint's step: nothing to do, and the summary is valid JSON
    proc = _train(tmp_path, demo_dir, 1, "train.steps=2", resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to train" in proc.stdout
    summary = json.loads(_lines(proc.stdout)[-1])  # json.loads accepts NaN: check the text too
    assert summary["final_loss"] is None and "NaN" not in proc.stdout


def test_second_job_is_refused_and_a_dead_holder_is_taken_over(demo_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {"host": socket.gethostname(), "pid": holder.pid, "job": "", "started": "2026-12-01T00:00:00"}
        (run / ".lock").write_text(json.dumps(lock))
        proc = _train(run, demo_dir, 1)
        assert proc.returncode == 2
        err = _lines(proc.stderr)
        assert len(err) == 1 and f"pid {holder.pid}" in err[0] and "in use" in err[0], proc.stderr
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over; a deadline already passed at start-up makes the
    # job save its starting point (step 0) and exit 42
    proc = _train(run, demo_dir, 1, "train.max_wall_time=1", "train.exit_margin_s=1")
    assert proc.returncode == 42, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "taking over the lock" in proc.stderr
    assert (run / "checkpoints" / "latest").read_text() == "step_00000000"
    assert json.loads((run / "preempted").read_text())["reason"] == "deadline"
    assert not (run / ".lock").exists()
