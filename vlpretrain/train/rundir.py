"""An exclusive lock on a run dir, so that two jobs never write one run's metrics and checkpoints; what a fresh
start would overwrite in a run dir (``previous_run``) and moving it aside (``checkpoint.overwrite``).

The lock is a file created with O_EXCL (atomic on local and network file systems) holding the holder's host,
pid, job id and start time; the holder refreshes its mtime as it trains. A lock is stale, and taken over with
a warning, when its holder is provably gone: the same host and a dead pid, the same job (a restarted or
requeued attempt of this job), or no refresh for ``STALE_AFTER_S``.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from vlpretrain.errors import UserError
from vlpretrain.parallel.peers import process_alive

LOCK_NAME = ".lock"
STALE_AFTER_S = 1800.0
_REFRESH_EVERY_S = 60.0


def job_id() -> str:
    """What stays the same across restarts of one job: Slurm's job id or torchrun's rendezvous id."""
    for key in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(key, "")
        if value and value != "none":
            return f"{key.split('_')[0].lower()}:{value}"
    return ""


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False
        self._refreshed = 0.0

    def _stale_reason(self, holder: dict) -> str | None:
        if holder.get("job") and holder["job"] == job_id():
            return "an earlier attempt of this job"
        if holder.get("host") == socket.gethostname() and not process_alive(int(holder.get("pid", 0))):
            return "its process is gone"
        age = time.time() - self.path.stat().st_mtime
        if age > STALE_AFTER_S:
            return f"not refreshed for {age / 60:.0f} min"
        return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "job": job_id(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text() or "{}")
                    reason = self._stale_reason(holder)
                except (OSError, ValueError):  # vanished or half-written by a racing job: look again
                    time.sleep(0.2)
                    continue
                if reason is None:
                    raise UserError(
                        f"run dir {self.path.parent} is in use by host {holder.get('host')} pid {holder.get('pid')}"
                        f"{' (' + holder['job'] + ')' if holder.get('job') else ''} since {holder.get('started')}; "
                        f"use another train.run_dir, or delete {self.path} if that job is dead") from None
                print(f"warning: taking over the lock of {self.path.parent} from host {holder.get('host')} pid "
                      f"{holder.get('pid')} ({reason})", file=sys.stderr, flush=True)
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.held = True
            self._refreshed = time.time()
            return
        raise UserError(f"could not lock run dir {self.path.parent} (another job keeps taking it)")

    def refresh(self) -> None:
        """Cheap heartbeat (an mtime update at most once a minute)."""
        if self.held and time.time() - self._refreshed > _REFRESH_EVERY_S:
            try:
                os.utime(self.path)
            except OSError:
                pass
            self._refreshed = time.time()

    def release(self) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False


def previous_run(run_dir: Path, ckpt_dir: Path) -> str | None:
    """What a fresh start would overwrite (checkpoints, or the metrics of a run killed before its first save), in
    words; None if nothing."""
    steps = [int(p.name[5:]) for p in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else ())
             if re.fullmatch(r"step_\d{8}", p.name) and p.is_dir()]
    if steps:
        return f"checkpoints up to step {max(steps)}"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        last = "?"
        for line in reversed(metrics.read_bytes().decode("utf-8", "replace").splitlines()):
            try:
                last = int(json.loads(line)["step"])
                break
            except (ValueError, KeyError, TypeError):
                continue
        return f"metrics up to step {last}, no checkpoint"
    return None


def move_previous_run_aside(run_dir: Path, ckpt_dir: Path) -> None:
    """``checkpoint.overwrite``: the run dir's contents go to a sibling ``<run_dir>.old-<time>``, and a checkpoint
    dir outside the run dir to ``<dir>.old-<time>``: a fresh start never deletes a run. The lock this job holds
    and ``logs/`` (the launchers' per-rank logs, open while this job runs) stay. Rank 0, holding the run dir's
    lock, before any process group exists."""
    previous = previous_run(run_dir, ckpt_dir)
    if previous is None:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        moved = _move_aside(run_dir, ckpt_dir, stamp)
    except OSError as e:
        raise UserError(f"checkpoint.overwrite: could not move the previous run of {run_dir} aside "
                        f"({type(e).__name__}: {e})") from None
    print(f"warning: checkpoint.overwrite: moved the previous run of {run_dir} ({previous}) aside to "
          f"{' and '.join(moved)}", file=sys.stderr, flush=True)


def _move_aside(run_dir: Path, ckpt_dir: Path, stamp: str) -> list[str]:
    def aside(path: Path) -> Path:
        target, n = path.with_name(f"{path.name}.old-{stamp}"), 1
        while target.exists():
            target, n = path.with_name(f"{path.name}.old-{stamp}.{n}"), n + 1
        return target

    moved = []
    if ckpt_dir.exists() and not ckpt_dir.resolve().is_relative_to(run_dir.resolve()):
        target = aside(ckpt_dir)
        os.replace(ckpt_dir, target)
        moved.append(str(target))
    entries = [p for p in run_dir.iterdir() if p.name not in (LOCK_NAME, "logs")] if run_dir.is_dir() else []
    if entries:
        target = aside(run_dir)
        target.mkdir()
        for p in entries:
            os.replace(p, target / p.name)
        moved.append(str(target))
    return moved
