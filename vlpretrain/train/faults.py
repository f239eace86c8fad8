"""Fault injection for the recovery tests, kept out of the training loop's body (it calls ``inject``).

``VLP_FAULT="kind:step:rank[,kind:step:rank...]"`` with kind ``kill`` (SIGKILL: a crash) or ``term``
(SIGTERM: a preemption) makes that global rank signal itself after that step's backward, before the
optimizer step; kind ``nan_loss`` / ``nan_grad`` makes that rank see a NaN loss / gradient norm at that step
(every time the step runs: a bad step, see bad_steps.py). Each signal fires once per job in every launcher: a
marker file in the run dir records that it fired, so a restarted or requeued job (whatever its restart counter
says) runs on. ``nan_sample:SOURCE:INDEX`` poisons one sample wherever it is drawn: its images reach the model
as NaN (a corrupt image decoded to NaN), so its row's loss is NaN (the sample must have an image).

Kind ``kill_worker`` SIGKILLs (as the kernel's OOM killer does) the DataLoader worker of that rank that is handed
that step to build (``data.num_workers`` > 0): the trainer gives the data pipeline ``in_worker`` as its
``before_build`` hook, so the data layer never imports this module.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "usr1": signal.SIGUSR1, "int": signal.SIGINT}
_POISON = {"nan_loss": "loss", "nan_grad": "grad"}
_SAMPLE = "nan_sample"
_WORKER = {"kill_worker": signal.SIGKILL}  # signals to a data worker (in_worker)


def _faults() -> list[tuple[str, int, int]]:
    spec = os.environ.get("VLP_FAULT", "")
    out = []
    for item in filter(None, spec.split(",")):
        if item.startswith(f"{_SAMPLE}:"):  # nan_sample:SOURCE:INDEX (poisoned_samples)
            continue
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


def poisoned_samples() -> set[tuple[str, int]]:
    """The (source name, sample index) pairs VLP_FAULT poisons."""
    out = set()
    for item in filter(None, os.environ.get("VLP_FAULT", "").split(",")):
        kind, _, rest = item.partition(":")
        if kind == _SAMPLE:
            source, _, index = rest.rpartition(":")
            out.add((source, int(index)))
    return out


def poison_samples(batch, names: list[str]) -> None:
    """Turn the images of every poisoned sample in this rank's rows into NaN (in place, floats in [0, 1])."""
    if _SAMPLE not in os.environ.get("VLP_FAULT", ""):
        return
    poisoned, rows = poisoned_samples(), iter(batch.samples)
    for mb in batch.microbatches:
        for r in range(mb.tokens.shape[0]):
            row = next(rows)
            if mb.images is None or not any((names[s], i) in poisoned for s, i in row):
                continue
            if mb.images.dtype == torch.uint8:  # the engine's own scaling, so that other rows are unchanged
                mb.images = mb.images.float().div_(255.0)
            mb.images[r] = float("nan")


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
