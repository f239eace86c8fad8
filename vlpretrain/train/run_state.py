"""What one run holds (``Run``, built by ``trainer._build``) and what of it a checkpoint carries beside the
weights and optimizer states (``train_state``: step, data state, progress, RNG), restored by ``restore_progress``
and ``set_rng_state`` when a run resumes or rolls back."""
from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LRScheduler

from vlpretrain.checkpoint.dcp import Checkpointer
from vlpretrain.config import Config
from vlpretrain.data.loader import DataPipeline, GlobalBatch
from vlpretrain.eval.evaluator import Evaluator
from vlpretrain.parallel.engine import ParallelModel
from vlpretrain.parallel.mesh import ParallelContext
from vlpretrain.train.bad_steps import BadStepPolicy, LossHistory
from vlpretrain.train.metrics import MetricsLogger, PeakMemory
from vlpretrain.train.preemption import Deadline
from vlpretrain.train.profiling import StepProfiler
from vlpretrain.train.rundir import RunDirLock
from vlpretrain.train.tower_cache import FrozenTowerCache


@dataclass
class Run:
    """What one run holds: built once by ``_build``; ``_record`` advances the progress fields after each step."""
    cfg: Config
    ctx: ParallelContext
    device: torch.device
    run_dir: Path
    lock: RunDirLock
    data: DataPipeline
    batches: Iterator[GlobalBatch]
    model: ParallelModel
    evaluator: Evaluator
    optimizers: list[torch.optim.Optimizer | None]  # one per model part; None where the part trains nothing
    schedulers: list[LRScheduler]  # the ones build_optimizer returned, one per optimizer
    ckpt: Checkpointer
    resumed: bool  # restored from a checkpoint of step ``start``
    deadline: Deadline
    trainable: list[str]
    peak_tflops: float
    logger: MetricsLogger
    memory: PeakMemory
    profiler: StepProfiler
    start: int = 0  # the step the run starts after
    step: int = 0  # the step in progress (for fault messages)
    peers: list[dict] = field(default_factory=list)  # every rank's host, pid, endpoints (naming a lost rank)
    consumed: int = 0  # samples consumed by all steps so far
    data_state: dict = field(default_factory=dict)  # the planner's state after the last step (checkpoints)
    first_loss: float | None = None
    loss: float | None = None  # the last finite loss
    bad_steps: BadStepPolicy = field(init=False)  # counts skipped updates against train.max_bad_steps
    history: LossHistory = field(init=False)  # recent good losses per modality: loss spikes
    bad_reason: str | None = None  # why the last step's update was skipped (bad_steps)
    bad_images: int = 0  # images no rank could decode, over the run (blanks were trained on)
    excluded: list[tuple[str, int]] = field(default_factory=list)  # (source name, index) bad steps took out
    first_grad_norm: float | None = None  # this run's (or resumed run's) first gradient norm
    tower_cache: FrozenTowerCache | None = None  # train.frozen_tower_cache_mb: frozen towers' outputs per image
    vanished_steps: int = 0  # steps in a row whose gradient norm vanished next to it (the trainer warns)

    def __post_init__(self):
        tc = self.cfg.train
        self.bad_steps = BadStepPolicy(tc.max_bad_steps)
        self.history = LossHistory(tc.spike_factor, tc.spike_window)


def train_state(run: Run) -> dict:
    """What a checkpoint's train_state.json holds beside the step."""
    lay = run.ctx.layout
    return {"consumed_samples": run.consumed, "data_state": run.data_state, "config": run.cfg.to_dict(),
            "layout": [lay.dp, lay.tp, lay.pp, lay.vpp], "split": run.model.split, "rng": rng_state(),
            "progress": {"bad_steps": run.bad_steps.state_dict(), "loss_history": run.history.state_dict(),
                         "excluded": [list(x) for x in run.excluded], "bad_images": run.bad_images}}


def restore_progress(run: Run, train_state: dict) -> None:
    """What a checkpoint carries of the run's progress beyond the step: bad-step counts, loss history, samples
    taken out, undecodable images."""
    progress = train_state.get("progress", {})
    run.bad_steps.load_state_dict(progress.get("bad_steps", {}))
    run.history.load_state_dict(progress.get("loss_history", {}))
    run.excluded = [(name, int(i)) for name, i in progress.get("excluded", [])]
    run.bad_images = progress.get("bad_images", 0)


def rng_state() -> dict:
    """The RNG states (every rank seeds alike and draws alike, so rank 0's stand for all)."""
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict | None) -> None:
    if not state:
        return
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))
