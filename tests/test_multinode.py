"""Multi-node launches without a cluster: two torchrun agents on 127.0.0.1 (c10d and static rendezvous) train
like one process; a SIGKILLed rank of a two-agent c10d job restarts both nodes and resumes (it used to hang:
the process group store was keyed by a restart counter the two agents disagree on); ranks started with
SLURM_* variables only (no torchrun) find each other; start-up waits are bounded and name missing ranks.

Every subprocess runs under a hard timeout and is killed by its own process id."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_parallel_train import _run, assert_same_training, train_args

from vlpretrain.parallel import launch_env

STEPS = ["train.steps=4", "checkpoint.interval=2"]  # a checkpoint at step 2 to resume from
DP2 = ("parallel.dp=2",)
PP2 = ("parallel.pp=2", "parallel.layer_split=[1,3]")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "VLP_PG_TIMEOUT_S": "60", **extra}


def _run_all(cmds: list[list[str]], envs: list[dict], logs: Path, timeout_s: float) -> list[tuple[int, str]]:
    """Start every command at once; (exit code, output) each. Past the timeout all are killed (by pid)."""
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for i, (cmd, env) in enumerate(zip(cmds, envs)):
        f = open(logs / f"proc{i}.log", "w+")
        files.append(f)
        procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        hung = [p for p in procs if p.poll() is None]
        for p in hung:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
    out = []
    for p, f in zip(procs, files):
        f.seek(0)
        out.append((p.returncode, f.read()))
        f.close()
    if hung:
        pytest.fail(f"hung for {timeout_s:.0f} s and was killed:\n" + "\n".join(o[-3000:] for _, o in out))
    return out


def _agents(rdzv: str, run_dir: Path, demo_dir: Path, *overrides: str, restarts: int = 0, resume: bool = False,
            env_extra: dict | None = None, timeout_s: float = 240) -> list[tuple[int, str]]:
    """Two torchrun agents ("nodes") of one process each on 127.0.0.1: c10d through launch/torchrun_multinode.sh
    (run on every node), static with torchrun's own options."""
    port = _free_port()
    args = train_args(run_dir, demo_dir, *STEPS, *overrides)  # train --config CONFIG --set KEY=VALUE ...
    env = _clean_env(**(env_extra or {}))
    if rdzv == "c10d":
        env.update(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID="vlptest",
                   MAX_RESTARTS=str(restarts), RESUME="auto" if resume else "", PYTHON=sys.executable,
                   TORCHRUN_ARGS="--monitor-interval=0.1")
        cmds = [["bash", str(REPO / "launch" / "torchrun_multinode.sh"), args[2], *args[4:]]] * 2
    else:
        cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                 f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
                 f"--max-restarts={restarts}", "-m", "vlpretrain", *args,
                 *(["--resume", "auto"] if resume else [])] for node in range(2)]
    return _run_all(cmds, [env, env], run_dir.parent / f"{run_dir.name}_logs", timeout_s)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(demo_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    return run, _run(1, run, demo_dir, *STEPS)


@pytest.mark.parametrize("rdzv,layout", [("c10d", DP2), ("static", PP2)], ids=["c10d-dp2", "static-pp2"])
def test_two_agents_match_single_process(rdzv, layout, single, demo_dir, tmp_path):
    ref_dir, ref = single
    t0 = time.monotonic()
    results = _agents(rdzv, tmp_path / "run", demo_dir, *layout)
    print(f"2 torchrun agents ({rdzv}, {layout[0]}), 2 ranks: {time.monotonic() - t0:.1f} s")
    for rc, out in results:
        assert rc == 0, out[-4000:]
    assert_same_training(_metrics(tmp_path / "run"), ref, tmp_path / "run", ref_dir)


def test_sigkill_restarts_both_agents_and_resumes(single, demo_dir, tmp_path):
    """Rank 1 dies of SIGKILL in step 3; both agents re-rendezvous (their restart counters may differ) and the
    job resumes from step 2. The old store keyed by TORCHELASTIC_RESTART_COUNT waited 10 minutes here."""
    ref_dir, ref = single
    t0 = time.monotonic()
    results = _agents("c10d", tmp_path / "run", demo_dir, *DP2, restarts=2, resume=True,
                      env_extra={"VLP_FAULT": "kill:3:1"}, timeout_s=240)
    print(f"c10d SIGKILL + restart, 2 agents x 1 rank: {time.monotonic() - t0:.1f} s")
    for rc, out in results:
        assert rc == 0, out[-4000:]
    logs = "".join(out for _, out in results)
    assert "exitcode: -9" in logs or "Signal 9" in logs, logs[-3000:]  # the kill happened
    assert "resumed from" in logs and "step_00000002" in logs
    assert_same_training(_metrics(tmp_path / "run"), ref, tmp_path / "run", ref_dir)  # no duplicate step lines


def test_torchrun_script_exits_42_when_preempted(demo_dir, tmp_path):
    """torchrun exits 1 when its workers were preempted; launch/torchrun_multinode.sh reads the run dir's
    `preempted` marker and exits 42 on every node, like the srun launch."""
    results = _agents("c10d", tmp_path / "run", demo_dir, *DP2, env_extra={"VLP_FAULT": "term:2:1"})
    for rc, out in results:
        assert rc == 42, out[-4000:]
    assert "torchrun_multinode: preempted" in results[0][1]
    assert json.loads((tmp_path / "run" / "preempted").read_text())["step"] == 2
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def _slurm_job_id() -> int:
    """A job id whose derived MASTER_PORT is free here."""
    for _ in range(100):
        job = random.randrange(100000, 999999)
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", launch_env.slurm_master_port(job)))
            return job
        except OSError:
            continue
    raise RuntimeError("no free port")


def _slurm_task_env(rank: int, job: int, nodes: str = "vlp-nodea,vlp-nodeb") -> dict:
    """What srun gives task ``rank`` of a 2-node step with one task per node (and no torchrun variables)."""
    return _clean_env(SLURM_JOB_ID=str(job), SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_LOCALID="0",
                      SLURM_NODEID=str(rank), SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2",
                      SLURM_STEP_NODELIST=nodes, SLURM_JOB_NODELIST=nodes, SLURM_STEP_TASKS_PER_NODE="1(x2)",
                      SLURM_TASKS_PER_NODE="1(x2)", SLURM_LAUNCH_NODE_IPADDR="127.0.0.1",
                      SLURM_SRUN_COMM_HOST="127.0.0.1")


def test_ranks_from_slurm_variables_only(single, demo_dir, tmp_path):
    """`srun python -m vlpretrain train`: ranks and the rendezvous come from SLURM_* (node names that do not
    resolve, like on this machine), the result equals the single-process run, one summary line (rank 0)."""
    ref_dir, ref = single
    job = _slurm_job_id()
    cmd = [sys.executable, "-m", "vlpretrain", *train_args(tmp_path / "run", demo_dir, *STEPS, *DP2)]
    t0 = time.monotonic()
    results = _run_all([cmd, cmd], [_slurm_task_env(0, job), _slurm_task_env(1, job)], tmp_path / "logs", 180)
    print(f"2 ranks from SLURM_* only: {time.monotonic() - t0:.1f} s")
    for rc, out in results:
        assert rc == 0, out[-4000:]
    assert '"train": "done"' in results[0][1] and '"train": "done"' not in results[1][1]
    assert_same_training(_metrics(tmp_path / "run"), ref, tmp_path / "run", ref_dir)


# ----------------------------------------------------------------------------- launch_env, in process
def test_hostlists_and_task_counts():
    assert launch_env.expand_hostlist("gpu-[01-03,7],login1") == ["gpu-01", "gpu-02", "gpu-03", "gpu-7", "login1"]
    assert launch_env.expand_hostlist("node[1-2]") == ["node1", "node2"]
    assert launch_env.expand_hostlist("a[1-2]-b[3-4]") == ["a1-b3", "a1-b4", "a2-b3", "a2-b4"]
    assert launch_env.expand_counts("8(x2),4") == [8, 8, 4]


def test_slurm_env_fills_torchrun_variables(monkeypatch):
    from vlpretrain.parallel.mesh import world_size_from_env

    for k in (*LAUNCH_VARS, "VLP_MASTER_ADDR_GUESSED"):  # set, then delete: monkeypatch removes what the
        monkeypatch.setenv(k, "")                           # code under test fills in, for later tests
        monkeypatch.delenv(k)
    # the batch script itself (SLURM_PROCID=0 but no step): one process, nothing filled in
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert world_size_from_env() == 1 and "RANK" not in os.environ
    # a task of an srun step: 2 nodes x 8 tasks, this is task 11 (node 1, local 3); names do not resolve
    for k, v in dict(SLURM_STEP_ID="0", SLURM_PROCID="11", SLURM_LOCALID="3", SLURM_NODEID="1",
                     SLURM_STEP_NUM_TASKS="16", SLURM_STEP_NODELIST="vlp-gpu[07-08]",
                     SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_LAUNCH_NODE_IPADDR="10.1.2.3").items():
        monkeypatch.setenv(k, v)
    assert world_size_from_env() == 16
    assert {k: os.environ[k] for k in LAUNCH_VARS[:-1]} == {
        "RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "10.1.2.3",
        "MASTER_PORT": str(launch_env.slurm_master_port(4242))}
    assert launch_env.where(11) == "node vlp-gpu08" and launch_env.where(3) == "node vlp-gpu07"
    monkeypatch.setenv("RANK", "5")  # torchrun's variables win over Slurm's
    monkeypatch.setenv("SLURM_PROCID", "0")
    launch_env.apply_launch_env()
    assert os.environ["RANK"] == "5"


def test_missing_rank_is_named_after_the_timeout(monkeypatch):
    for k, v in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                     SLURM_STEP_NODELIST="vlp-nodea,vlp-nodeb", SLURM_STEP_TASKS_PER_NODE="1(x2)").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(launch_env.LaunchError, match=r"1 of 2 ranks did not start within 2 s .*missing ranks "
                                                    r"1 \(node vlp-nodeb\)"):
        launch_env.process_group_store(2.0)
    assert time.monotonic() - t0 < 10


def _round(agent_port: int, counts: tuple[int, int], timeout_s: float = 20.0) -> list:
    """One torchrun round of two ranks (threads) sharing an agent store; ``counts``: each worker's
    TORCHELASTIC_RESTART_COUNT. Returns both ranks' stores (or the exception each raised)."""
    out: list = [None, None]

    def rank(r: int) -> None:
        env = {"RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(agent_port),
               "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "t1",
               "TORCHELASTIC_RESTART_COUNT": str(counts[r])}
        try:
            out[r] = launch_env.process_group_store(timeout_s, env)
        except Exception as e:  # noqa: BLE001 (reported by the test)
            out[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]  # rank 1 first: it sees stale entries
    for t in threads:
        t.start()
        time.sleep(0.5)
    for t in threads:
        t.join(timeout=timeout_s + 10)
    return out


def test_restart_rounds_agree_whatever_the_restart_counters():
    """After a c10d membership change the healthy node's workers keep TORCHELASTIC_RESTART_COUNT=0 while the
    restarted node's get 1. Round 2 must still put both ranks on one fresh store (keys of round 1 are gone);
    a store keyed by the counter made rank 1 wait forever here."""
    from datetime import timedelta

    import torch.distributed as dist

    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    first = _round(agent.port, (0, 0))
    assert all(isinstance(s, dist.Store) for s in first), first
    first[0].set("round", "1")
    del first  # round 1's workers die: their store (hosted by rank 0) goes with them
    t0 = time.monotonic()
    second = _round(agent.port, (0, 1))
    assert all(isinstance(s, dist.Store) for s in second), second
    second[0].set("hello", "round 2")
    assert second[1].get("hello") == b"round 2" and not second[1].check(["round"])
    assert time.monotonic() - t0 < 15
