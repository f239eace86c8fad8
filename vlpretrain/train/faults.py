"""Fault injection for the recovery tests, kept out of the training loop's body (it calls ``inject``).

``VLP_FAULT="kind:step:rank[,kind:step:rank...]"`` with kind ``kill`` (SIGKILL: a crash) or ``term``
(SIGTERM: a preemption) makes that global rank signal itself after that step's backward, before the
optimizer step; kind ``nan_loss`` / ``nan_grad`` makes that rank see a NaN loss / gradient norm at that step
(every time the step runs: a bad step, see bad_steps.py). Each signal fires once per job in every launcher: a
marker file in the run dir records that it fired, so a restarted or requeued job (whatever its restart counter
says) runs on.

Kind ``kill_worker`` SIGKILLs (as the kernel's OOM killer does) the DataLoader worker of that rank that is handed
that step to build (``data.num_workers`` > 0): the trainer gives the data pipeline ``in_worker`` as its
``before_build`` hook, so the data layer never imports this module.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "usr1": signal.SIGUSR1, "int": signal.SIGINT}
_POISON = {"nan_loss": "loss", "nan_grad": "grad"}
_WORKER = {"kill_worker": signal.SIGKILL}  # signals to a data worker (in_worker)


def _faults() -> list[tuple[str, int, int]]:
    spec = os.environ.get("VLP_FAULT", "")
    out = []
    for item in filter(None, spec.split(",")):
        kind, step, rank = item.split(":")
        if kind not in _SIGNALS and kind not in _POISON and kind not in _WORKER:
            known = sorted(_SIGNALS) + sorted(_POISON) + sorted(_WORKER)
            raise ValueError(f"VLP_FAULT: unknown kind {kind!r} (one of {known})")
        out.append((kind, int(step), int(rank)))
    return out


def inject(step: int, rank: int, run_dir: Path) -> None:
    for kind, at, who in _faults():
        if at != step or who != rank or kind not in _SIGNALS:
            continue
        marker = Path(run_dir) / ".faults" / f"{kind}_{at}_{who}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:  # fired before in this job
            continue
        os.kill(os.getpid(), _SIGNALS[kind])


def poison(step: int, rank: int, value: float, what: str = "loss") -> float:
    """``value``, or NaN where VLP_FAULT asks for a ``nan_<what>`` at this step on this rank."""
    if "nan" not in os.environ.get("VLP_FAULT", ""):
        return value
    hit = any(_POISON.get(kind) == what and at == step and who == rank for kind, at, who in _faults())
    return float("nan") if hit else value


def in_worker(step: int, rank: int, run_dir: Path) -> None:
    """Called in a DataLoader worker before it builds ``step``: a ``kill_worker`` fault kills this worker."""
    if "worker" not in os.environ.get("VLP_FAULT", ""):
        return
    for kind, at, who in _faults():
        if kind not in _WORKER or at != step or who != rank:
            continue
        marker = Path(run_dir) / ".faults" / f"{kind}_{at}_{who}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:  # fired before in this job: a resumed run builds this step
            continue
        os.kill(os.getpid(), _WORKER[kind])
