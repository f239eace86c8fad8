"""Preemption handlers are the installing process's own: forked children get the default dispositions back,
and whoever installs them (the CLI, ``train``) restores what was there before.

The regression: with the handlers inherited, ``Pool.terminate()``'s SIGTERM only set a flag in a worker, the
worker went on to wait for the queue lock that the terminating parent held, and ``join`` waited for ever (the
suite hung in ``test_tokenize_tool``). The fork test runs in a fresh process under a time limit, so a hang fails.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import REPO

FORK_THEN_TERMINATE = r"""
import multiprocessing, os, signal, sys, time
from vlpretrain.train.preemption import PREEMPTION

def work(i):
    time.sleep(0.05)
    return i

PREEMPTION.install(["SIGTERM", "SIGUSR1", "SIGUSR2"])
ctx = multiprocessing.get_context("fork")
for attempt in range(int(sys.argv[1])):
    pool = ctx.Pool(2)
    results = [pool.apply_async(work, (i,)) for i in range(200)]
    results[0].get(timeout=30)  # the workers are mid-work, tasks wait in the queue
    pool.terminate()  # SIGTERM to each worker, the parent drains the task queue holding its lock
    pool.join()
assert not PREEMPTION.requested, PREEMPTION.signal_name  # the workers' SIGTERMs were theirs, not ours
print("ok")
"""


def test_forked_pool_terminates_while_handlers_installed():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # its own process group: on a hang the stuck pool workers (which hold the output pipes) are killed with it
    proc = subprocess.Popen([sys.executable, "-c", FORK_THEN_TERMINATE, "20"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # the hang this guards against
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("Pool.terminate() hung with the preemption handlers installed") from None
    assert proc.returncode == 0 and out.strip().endswith("ok"), err[-3000:]


def test_forked_child_gets_default_dispositions():
    from vlpretrain.train.preemption import PREEMPTION

    with PREEMPTION.handling(["SIGTERM", "SIGUSR1"]):
        assert signal.getsignal(signal.SIGTERM) == PREEMPTION._on_signal
        pid = os.fork()
        if pid == 0:  # child: the defaults, so SIGTERM ends it
            ok = all(signal.getsignal(s) == signal.SIG_DFL for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT))
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_handling_restores_previous_handlers_and_nests():
    from vlpretrain.train.preemption import PREEMPTION

    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGUSR1, mine)
    try:
        int_before = signal.getsignal(signal.SIGINT)
        with PREEMPTION.handling(["SIGUSR1"]):
            with PREEMPTION.handling(["SIGUSR1"]):  # the trainer inside the CLI: no second install
                assert signal.getsignal(signal.SIGUSR1) == PREEMPTION._on_signal
            assert signal.getsignal(signal.SIGUSR1) == PREEMPTION._on_signal  # the inner block did not undo
            os.kill(os.getpid(), signal.SIGUSR1)
            assert PREEMPTION.signal_name == "SIGUSR1"
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert signal.getsignal(signal.SIGINT) == int_before
        with PREEMPTION.handling(["SIGUSR1"]):  # a new command starts with no request pending
            assert not PREEMPTION.requested
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_cli_train_leaves_no_handlers(tmp_path):
    """``vlpretrain train`` in-process (as tests call it): its handlers are gone when it returns, even on an error."""
    from vlpretrain.cli import main

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    rc = main(["train", "--config", str(REPO / "configs" / "tiny" / "stage2.yaml"), "--set",
               f"data.root={tmp_path / 'missing'}", f"train.run_dir={tmp_path / 'run'}"])
    assert rc != 0
    assert {s: signal.getsignal(s) for s in before} == before
