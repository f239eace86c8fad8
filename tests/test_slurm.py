"""launch/slurm/ on a real Slurm cluster: slurmctld + two slurmd on this machine (tests/slurm_cluster.py),
installed from Debian's packages when running as root, skipped otherwise.

The tiny two-node job (one CPU rank per node) runs to completion with the single-process run's losses, and as
the README's smoke test on a fresh checkout (no earlier stage, only the demo data);
`scancel --signal=USR1` and an outside `scontrol requeue` (SIGTERM) make it save, exit 42, requeue and finish
with the uninterrupted run's losses, no duplicate metric lines; the same with one torchrun agent per node
(torchrun exits 1: the `preempted` marker tells the script)."""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from slurm_cluster import SlurmCluster, ensure_installed
from test_parallel_train import _run, assert_same_training, train_args

STEPS = ["train.steps=10", "checkpoint.interval=0", "parallel.dp=2"]
TINY_JOB = REPO / "launch" / "slurm" / "tiny-2node.sbatch"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = ensure_installed()
    if reason is None and os.geteuid() != 0:
        reason = "the test cluster's slurmd runs as root"
    if reason:
        pytest.skip(f"no Slurm test cluster: {reason}")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    t0 = time.monotonic()
    try:
        c.start()
        print(f"Slurm cluster (slurmctld + 2 slurmd) up in {time.monotonic() - t0:.1f} s")
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def single(demo_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    return run, _run(1, run, demo_dir, *[s for s in STEPS if not s.startswith("parallel.")])


def _submit(cluster: SlurmCluster, run_dir: Path, demo_dir: Path, **env: str) -> int:
    sets = train_args(run_dir, demo_dir, *STEPS)[4:]  # KEY=VALUE overrides after `--set`
    return cluster.submit(TINY_JOB, *sets, env={"VLP_HOME": str(REPO), "PYTHON": sys.executable,
                                                "OMP_NUM_THREADS": "1", "VLP_PG_TIMEOUT_S": "60", **env})


def _finished(cluster: SlurmCluster, job: int, restarts: int, timeout_s: float) -> dict:
    """Wait until the job has completed after ``restarts`` requeues (or failed)."""
    end = time.monotonic() + timeout_s
    info: dict = {}
    while time.monotonic() < end:
        info = cluster.job(job)
        state, n = info.get("JobState"), int(info.get("Restarts", "0"))
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") or \
                (state == "COMPLETED" and n >= restarts):
            return info
        time.sleep(0.5)
    cluster.cmd("scancel", str(job), check=False)
    pytest.fail(f"job {job} did not finish in {timeout_s:.0f} s: {info}\n{cluster.logs()}")


def _wait_steps(run_dir: Path, n: int, timeout_s: float = 90) -> None:
    end = time.monotonic() + timeout_s
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < end:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    pytest.fail(f"no {n} steps in {path} after {timeout_s:.0f} s")


def _job_log(cluster: SlurmCluster, job: int) -> str:
    return "".join(p.read_text() for p in cluster.root.glob(f"*-{job}.out"))


def _rank_logs(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").rglob("*.log")))


def _metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_two_node_job_completes(cluster, single, demo_dir, tmp_path):
    ref_dir, ref = single
    t0 = time.monotonic()
    job = _submit(cluster, tmp_path / "run", demo_dir)
    info = _finished(cluster, job, 0, 180)
    print(f"tiny-2node.sbatch, 2 nodes x 1 rank (srun): {time.monotonic() - t0:.1f} s")
    log = _job_log(cluster, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log + _rank_logs(tmp_path / "run")
    assert "2 nodes (node1 node2) x 1 ranks, srun" in log and "finished" in log
    assert {p.name for p in (tmp_path / "run" / "logs").glob("rank_*.log")} == {"rank_0.log", "rank_1.log"}
    assert_same_training(_metrics(tmp_path / "run"), ref, tmp_path / "run", ref_dir)


def test_smoke_test_runs_on_a_fresh_checkout(cluster, demo_dir, tmp_path):
    """README: `sbatch launch/slurm/tiny-2node.sbatch data.root=...` from the root of a fresh checkout (no
    runs/tiny-stage1, which the config's train.init_from names): it trains, evaluates and finishes."""
    checkout = tmp_path / "checkout"
    for part in ("vlpretrain", "configs", "launch"):
        shutil.copytree(REPO / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
    t0 = time.monotonic()
    job = cluster.submit(checkout / "launch" / "slurm" / "tiny-2node.sbatch", f"data.root={demo_dir}", cwd=checkout,
                         env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "VLP_PG_TIMEOUT_S": "60"})
    info = _finished(cluster, job, 0, 240)
    print(f"smoke test (tiny-2node.sbatch, fresh checkout): {time.monotonic() - t0:.1f} s")
    log = "".join(p.read_text() for p in checkout.glob(f"*-{job}.out"))
    run = checkout / "runs" / f"tiny-2node-{job}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log + _rank_logs(run)
    assert "finished" in log and [r["step"] for r in _metrics(run)] == list(range(1, 21))
    assert (run / "summary.json").is_file() and not (checkout / "runs" / "tiny-stage1").exists()


@pytest.mark.parametrize("how,launcher", [("usr1", "srun"), ("requeue", "srun"), ("usr1", "torchrun")],
                         ids=["scancel-usr1", "scontrol-requeue", "torchrun-usr1"])
def test_preempted_job_requeues_and_resumes(how, launcher, cluster, single, demo_dir, tmp_path):
    """A preemption after step 2: every rank saves and exits 42, the job is requeued (by its script on 42 or
    the marker, or by the outside `scontrol requeue`) and the next attempt resumes: the uninterrupted losses."""
    ref_dir, ref = single
    run = tmp_path / "run"
    t0 = time.monotonic()
    job = _submit(cluster, run, demo_dir, LAUNCHER=launcher)
    _wait_steps(run, 2)
    if how == "usr1":  # like --signal=USR1@N before the time limit (all steps' processes, not the batch shell)
        cluster.cmd("scancel", "--signal=USR1", str(job))
    else:  # the administrator's (or the scheduler's) requeue: SIGTERM, then SIGKILL after KillWait=10 s
        cluster.cmd("scontrol", "requeue", str(job))
    info = _finished(cluster, job, 1, 240)
    print(f"{how} ({launcher}), 2 nodes x 1 rank: preempted, requeued and finished in "
          f"{time.monotonic() - t0:.1f} s (Restarts={info.get('Restarts')})")
    log, ranks = _job_log(cluster, job), _rank_logs(run)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, log + ranks[-4000:]
    signal_name = "SIGUSR1" if how == "usr1" else "SIGTERM"
    assert f"preempted ({signal_name}): saved step" in ranks and "exiting with 42" in ranks, ranks[-4000:]
    assert "resumed from" in ranks
    if how == "usr1":  # the script itself requeued (after exit 42 or, under torchrun, the marker)
        assert "requeueing" in log, log
    assert "attempt 1: finished" in log, log
    assert not (run / "preempted").exists()  # the finished attempt removed the marker
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 11))  # no duplicate or missing lines
    assert_same_training(rows, ref, run, ref_dir)
