"""Fault injection for the recovery tests, kept out of the training loop's body (it calls ``inject``).

``VLP_FAULT="kind:step:rank[,kind:step:rank...]"`` with kind ``kill`` (SIGKILL: a crash) or ``term``
(SIGTERM: a preemption) makes that global rank signal itself after that step's backward, before the
optimizer step. Each fault fires once per job in every launcher: a marker file in the run dir records that
it fired, so a restarted or requeued job (whatever its restart counter says) runs on.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "usr1": signal.SIGUSR1, "int": signal.SIGINT}


def _faults() -> list[tuple[str, int, int]]:
    spec = os.environ.get("VLP_FAULT", "")
    out = []
    for item in filter(None, spec.split(",")):
        kind, step, rank = item.split(":")
        if kind not in _SIGNALS:
            raise ValueError(f"VLP_FAULT: unknown kind {kind!r} (one of {sorted(_SIGNALS)})")
        out.append((kind, int(step), int(rank)))
    return out


def inject(step: int, rank: int, run_dir: Path) -> None:
    for kind, at, who in _faults():
        if at != step or who != rank:
            continue
        marker = Path(run_dir) / ".faults" / f"{kind}_{at}_{who}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:  # fired before in this job
            continue
        os.kill(os.getpid(), _SIGNALS[kind])
