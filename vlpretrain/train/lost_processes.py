"""A data worker or a rank lost mid-run: one line that names it, says what was saved and how to continue, and an
exit code of its own, instead of torch's tracebacks.

- ``EXIT_DATA_WORKER_LOST`` (44): a DataLoader worker of this rank died (``data.num_workers`` > 0), almost always
  SIGKILLed by the kernel's OOM killer; torch's error is about 90 lines ending in "DataLoader worker (pid N) is
  killed by signal: Killed".
- ``EXIT_RANK_LOST`` (45): a collective failed because another rank went away (gloo: "Connection closed by
  peer"); the survivor names that rank (``parallel/peers.py``).

Beside ``EXIT_PREEMPTED`` (42, saved, requeued by the sbatch template) and ``EXIT_DIVERGED`` (43). Nothing is
saved on the way out (the other ranks may be gone); the run continues from its last checkpoint with
``--resume auto`` (torchrun ``--max-restarts`` does that by itself).
"""
from __future__ import annotations

from pathlib import Path

from vlpretrain.data.loader import DataPipeline
from vlpretrain.errors import RunFault
from vlpretrain.parallel.peers import lost_peer

EXIT_DATA_WORKER_LOST = 44
EXIT_RANK_LOST = 45

_WHY = {
    "SIGKILL": "usually the kernel's OOM killer (memory per worker: lower data.num_workers, data.prefetch_steps or "
               "data.max_image_pixels; `dmesg` shows the kill)",
    "SIGBUS": "usually a full /dev/shm, where workers hand over their steps (enlarge it, or lower "
              "data.num_workers / data.prefetch_steps)",
}


def lost_process(exc: BaseException, data: DataPipeline, peers: list[dict], rank: int, step: int,
                 ckpt_dir: Path) -> RunFault | None:
    """The one-line fault for ``exc`` when it says a data worker or another rank was lost; else None."""
    death = data.worker_death(exc)
    if death is not None:
        who = f"data worker {death.worker}" if death.worker is not None else "a data worker"
        pid = f" (pid {death.pid})" if death.pid is not None else ""
        why = _WHY.get(death.signal, "it crashed (data.num_workers=0 shows the error in the training process)")
        return RunFault(f"rank {rank}: {who}{pid} was killed by {death.signal} during step {step}: {why}; "
                        f"{_saved(ckpt_dir)}: continue with --resume auto; exiting with {EXIT_DATA_WORKER_LOST}",
                        EXIT_DATA_WORKER_LOST)
    peer = lost_peer(exc, peers, rank)
    if peer is not None:
        return RunFault(f"{peer} was lost during step {step} (seen by rank {rank}); {_saved(ckpt_dir)}: restart "
                        f"the job with --resume auto (torchrun --max-restarts does); exiting with {EXIT_RANK_LOST}",
                        EXIT_RANK_LOST)
    return None


def _saved(ckpt_dir: Path) -> str:
    latest = Path(ckpt_dir) / "latest"
    try:
        return f"the last checkpoint is {ckpt_dir}/{latest.read_text().strip()}"
    except (OSError, UnicodeDecodeError):
        return "no checkpoint was saved yet"
