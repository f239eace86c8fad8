"""Faults around a run: Ctrl-C, deadlines, two jobs in one run dir, resumes that rewind, runs with nothing left
to do, a data worker killed (as by the OOM killer), a rank lost under torchrun (the survivor names it). Each fires
through the ``faults`` hook (once per job) or the run dir itself."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

from conftest import REPO, TINY
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


def test_killed_data_worker_is_one_line_then_resume_continues(demo_dir, tmp_path):
    """A DataLoader worker SIGKILLed (as by the OOM killer) while it builds step 5: one line naming the rank,
    the worker, the signal, the likely cause and the last checkpoint, exit 44; `--resume auto` finishes."""
    worker = ("data.num_workers=1", "data.prefetch_steps=1", "train.steps=6")
    proc = _train(tmp_path, demo_dir, 1, *worker, env_extra={"VLP_FAULT": "kill_worker:5:0"})
    assert proc.returncode == 44, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    err = [line for line in _lines(proc.stderr) if line.startswith("error")]  # (+ the data layer's warnings)
    assert len(err) == 1 and _lines(proc.stderr)[-1] == err[0], proc.stderr
    assert err[0].startswith("error: rank 0: data worker 0 (pid "), err
    assert "killed by SIGKILL" in err[0] and "OOM killer" in err[0] and "data.num_workers" in err[0], err
    latest = (tmp_path / "checkpoints" / "latest").read_text()  # step 2 or 4: the worker builds a step ahead
    assert f"the last checkpoint is {tmp_path / 'checkpoints' / latest}" in err[0] and "--resume auto" in err[0]
    proc = _train(tmp_path, demo_dir, 1, *worker, resume=True, env_extra={"VLP_FAULT": "kill_worker:5:0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and sorted(_metrics(tmp_path)) == [1, 2, 3, 4, 5, 6]


def test_lost_rank_is_named_by_the_survivor(demo_dir, tmp_path):
    """torchrun, 2 ranks (dp=2), rank 1 SIGKILLed in step 3: rank 0's output is one line naming rank 1 (host,
    pid), the step, the last checkpoint and --resume auto, exit 45; no traceback from rank 0."""
    logs = tmp_path / "logs"
    sets = [f"data.root={demo_dir}", f"train.run_dir={tmp_path / 'run'}", "train.init_from=", "train.eval_file=",
            "train.steps=4", "checkpoint.interval=2", "train.global_batch_size=8", "train.micro_batch_size=2",
            "train.seq_len=128", "data.packing=false", "parallel.dp=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0",
           f"--log-dir={logs}", "--redirects=3", "-m", "vlpretrain", "train", "--config", str(TINY / "stage2.yaml"),
           "--set", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "VLP_FAULT": "kill:3:1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and "exitcode: -9" in proc.stderr, proc.stderr[-3000:]  # rank 1 was killed
    (rank0,) = logs.rglob("attempt_0/0/stderr.log")
    text = rank0.read_text()
    assert "Traceback" not in text, text[-3000:]
    err = [line for line in _lines(text) if line.startswith("error")]
    assert len(err) == 1 and _lines(text)[-1] == err[0], text[-3000:]
    assert err[0].startswith("error: rank 1 (host ") and " was lost during step 3 (seen by rank 0)" in err[0], err
    assert f"the last checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step_00000002'}" in err[0], err
    assert "--resume auto" in err[0] and err[0].endswith("exiting with 45"), err  # (unless torchrun's SIGTERM
    # to the survivors comes first: it sends one as soon as it sees rank 1 die)


def test_lost_peer_maps_the_gloo_address_to_a_rank():
    """The address in gloo's error is the dead rank's end of a connection, its port printed byte-swapped by
    torch 2.14's gloo; the exact port is tried too. Without a match, a rank on this host whose pid is gone."""
    from vlpretrain.parallel.peers import _tcp_endpoints, lost_peer

    peers = [{"host": "a", "pid": 11, "endpoints": ["10.0.0.1:40001"]},
             {"host": "b", "pid": 22, "endpoints": ["10.0.0.2:37645", "10.0.0.2:41000"]},
             {"host": "c", "pid": 33, "endpoints": ["10.0.0.3:37645"]}]
    swapped = RuntimeError("[pair.cc:545] Read error [10.0.0.2]:3475: Connection reset by peer. This is ...")
    assert lost_peer(swapped, peers, 0) == "rank 1 (host b, pid 22)"
    exact = RuntimeError("[pair.cc:561] Connection closed by peer [::ffff:10.0.0.3]:37645. GLHF")
    assert lost_peer(exact, peers, 0) == "rank 2 (host c, pid 33)"
    assert lost_peer(RuntimeError("Connection closed by peer [10.9.9.9]:1"), peers, 0) == "a rank at 10.9.9.9"
    assert lost_peer(RuntimeError("CUDA out of memory"), peers, 0) is None
    assert lost_peer(exact, [], 0) is None  # one process
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = [{"host": socket.gethostname(), "pid": os.getpid(), "endpoints": _tcp_endpoints()},
            {"host": socket.gethostname(), "pid": dead.pid, "endpoints": []}]
    got = lost_peer(RuntimeError("Connection closed by peer [127.0.0.1]:1"), here, 0)
    assert got == f"rank 1 (host {socket.gethostname()}, pid {dead.pid})"
