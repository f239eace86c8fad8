"""Preemption: signals and deadlines end a run with a complete checkpoint and exit code 42.

The handler is installed first thing (``vlpretrain train`` does it before torch, the model or the data are
loaded), so a signal that arrives during start-up, a step or a save is never lost: it only sets a flag, and
the trainer acts on it at the next step boundary, where all ranks agree (one tiny all-reduce) and save together.
Slurm's warning signal is unreliable after a requeue (it arrives again at the start, then never), so a
self-deadline (``train.max_wall_time`` and the Slurm job's end time) triggers the same save early enough.

The handlers belong to the process that installed them: a forked child (DataLoader worker, a ``Pool``) gets
the default dispositions back at fork, so ``Pool.terminate()``'s SIGTERM still ends it, and a handler that runs
in another process anyway re-delivers the signal with its default action. ``uninstall`` restores the handlers
that were there before (the CLI does it when the command returns; tests that install restore too).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

EXIT_PREEMPTED = 42  # distinct from failures: the job saved a checkpoint and can be resumed
PREEMPTED_MARKER = "preempted"  # written into the run dir on exit 42, for launchers that cannot see the code


class Preemption:
    """Collects preemption requests: signals (any rank) and the deadline (checked by the caller)."""

    def __init__(self):
        self.signal_name: str | None = None
        self.t0 = time.time()
        self._interrupts = 0
        self._pid: int | None = None  # the process whose handlers these are
        self._previous: dict[int, object] = {}  # signal number -> the handler before install

    @contextlib.contextmanager
    def handling(self, names: list[str]):
        """Handle the signals inside the block; the outermost block of this process installs and restores."""
        outermost = self._pid != os.getpid()
        if outermost:
            self.install(names)
        try:
            yield self
        finally:
            if outermost:
                self.uninstall()

    def install(self, names: list[str]) -> None:
        """Handle ``names`` (e.g. ["SIGTERM", "SIGUSR1"]) and SIGINT in this process; idempotent."""
        if self._pid != os.getpid():  # first install in this process: no request seen yet
            self._previous, self.signal_name, self._interrupts = {}, None, 0
            self.t0 = time.time()
        self._pid = os.getpid()
        wanted = {int(getattr(signal, name)): self._on_signal for name in names}
        wanted[int(signal.SIGINT)] = self._on_interrupt
        for signum, handler in wanted.items():
            previous = signal.signal(signum, handler)
            self._previous.setdefault(signum, previous)

    def uninstall(self) -> None:
        """Put back the handlers that were there before ``install`` (only in the process that installed)."""
        if self._pid == os.getpid():
            for signum, previous in self._previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous, self._pid = {}, None

    def _reset_in_child(self) -> None:
        """After a fork: the child is not the trainer; give it the default dispositions back."""
        if self._pid is not None and self._pid != os.getpid():
            for signum in self._previous:
                signal.signal(signum, signal.SIG_DFL)
            self._previous, self._pid = {}, None

    def _foreign(self, signum: int) -> bool:
        """A handler running in a process that did not install it (fork without the reset, e.g. os.fork from C):
        act as the default would."""
        if self._pid == os.getpid():
            return False
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return True

    def _on_signal(self, signum, frame) -> None:
        if self._foreign(signum):
            return
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def _on_interrupt(self, signum, frame) -> None:
        if self._foreign(signum):
            return
        self._interrupts += 1
        if self._interrupts > 1:  # a second Ctrl-C: the user does not want to wait for the save
            raise KeyboardInterrupt
        self.signal_name = self.signal_name or "SIGINT"
        print("interrupted: saving a checkpoint at the end of this step (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


PREEMPTION = Preemption()  # one per process: installed by the CLI before anything heavy
os.register_at_fork(after_in_child=PREEMPTION._reset_in_child)


def slurm_end_time() -> float | None:
    """The running Slurm job's end time (epoch seconds), or None outside Slurm / without a time limit."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    if os.environ.get("SLURM_JOB_END_TIME", "").isdigit():
        end = int(os.environ["SLURM_JOB_END_TIME"])
        return float(end) if end > 0 else None
    if shutil.which("squeue") is None:
        return None
    try:  # %e is the end time; "N/A" or "Unknown" without a time limit
        out = subprocess.run(["squeue", "-h", "-j", os.environ["SLURM_JOB_ID"], "-o", "%e"], capture_output=True,
                             text=True, timeout=20).stdout.strip()
        return time.mktime(time.strptime(out, "%Y-%m-%dT%H:%M:%S"))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class Deadline:
    """When to stop so that the final save still fits: the earliest of ``max_wall_time`` (seconds from the
    process start) and the Slurm job's end time, minus a margin of twice the slowest step plus twice the
    slowest save seen (``margin_s`` > 0 fixes it instead)."""

    def __init__(self, max_wall_time: float, margin_s: float, t0: float):
        ends = [t for t in (t0 + max_wall_time if max_wall_time > 0 else None, slurm_end_time()) if t]
        self.end = min(ends) if ends else None
        self.fixed_margin = margin_s
        self.slowest_step = 0.0
        self.slowest_save = 0.0

    def observe(self, step_s: float = 0.0, save_s: float = 0.0) -> None:
        self.slowest_step = max(self.slowest_step, step_s)
        self.slowest_save = max(self.slowest_save, save_s)

    def margin(self) -> float:
        if self.fixed_margin > 0:
            return self.fixed_margin
        return 2 * self.slowest_step + 2 * self.slowest_save + 5.0

    def reached(self) -> bool:
        return self.end is not None and time.time() + self.margin() >= self.end
