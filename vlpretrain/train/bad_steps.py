"""Bad steps: a step whose loss or global gradient norm is not finite, or whose loss spikes, applies no update.
What happens next is ``train.on_bad_step``: ``skip`` (go on), ``rollback`` (reload the newest good checkpoint,
never draw the step's offending samples again, replay: ``trainer._rollback``) or ``stop``; after
``train.max_bad_steps`` bad steps in a row the run stops with exit 43 without saving the state it diverged into.

A skipped step still counts as a step: its data is consumed, its metrics line is written (``bad_step_reason``,
``bad_steps``) and the LR schedule advances. Megatron keeps the schedule where it was on a skipped update; here the
LR is a function of the step number (resume moves the schedule to the checkpoint's step, the metrics log
``lr_multiplier(step - 1)``), so advancing it keeps a resumed run and the logged LR identical to an uninterrupted
one.

Every rank reaches the same decision: the loss ``forward_backward`` returns is reduced over pp and dp and the
gradient norm over dp, tp and pp, and the flags are OR-ed over the world anyway (one tiny all-reduce that also sums
the step's undecodable images), so no rank steps its optimizer while another skips. A spike is judged against
``LossHistory``, which every rank keeps alike from the same global losses and which checkpoints carry, so resumed
and replayed runs judge alike.

Spike rule: a step's loss is a spike when it exceeds ``train.spike_factor`` times the median of the last
``train.spike_window`` good losses of its modality (text, multimodal and mixed steps sit at different levels),
once half a window of them is known. The default 3 leaves room over the noisiest loss the tiny demo shows (2.5x
its median, a small-batch fine-tuning stage); runs with smoother losses can go lower.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

EXIT_DIVERGED = 43  # beside EXIT_PREEMPTED (42): the run diverged; nothing of the bad state was saved
DIVERGED_MARKER = "DIVERGED"  # in the run dir: a restarted launcher must not retry a diverged run
NONFINITE_LOSS, NONFINITE_GRAD, LOSS_SPIKE = "non-finite loss", "non-finite grad norm", "loss spike"


def step_flags(loss: float, grad_norm: float, bad_images: int,
               device: torch.device | None = None) -> tuple[str | None, int]:
    """Why this step must not update the weights (None: it may; non-finite values only) and the step's
    undecodable images summed over the ranks that count them. Collective when a process group is up."""
    flags = [0.0 if math.isfinite(loss) else 1.0, 0.0 if math.isfinite(grad_norm) else 1.0, float(bad_images)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(flags, device=device, dtype=torch.float64)
        dist.all_reduce(t)
        flags = t.tolist()
    reason = NONFINITE_LOSS if flags[0] else NONFINITE_GRAD if flags[1] else None
    return reason, int(flags[2])


def bad_step_reason(loss: float, grad_norm: float, device: torch.device | None = None) -> str | None:
    """Why this step must not update the weights for non-finite values (None: it may). Collective."""
    return step_flags(loss, grad_norm, 0, device)[0]


class LossHistory:
    """The last ``window`` good losses of each modality, to tell a loss spike (see the module doc)."""

    def __init__(self, factor: float, window: int):
        self.factor, self.window = factor, window
        self.losses: dict[str, deque] = {}

    def median(self, modality: str) -> float | None:
        """The median the spike rule compares with; None while too few losses are known (or detection is off)."""
        seen = self.losses.get(modality, ())
        if self.factor <= 0 or len(seen) < max(1, self.window // 2):
            return None
        return statistics.median(seen)

    def limit(self, modality: str) -> float | None:
        """The loss above which a step of this modality is a spike (None: no limit yet)."""
        m = self.median(modality)
        return None if m is None else self.factor * m

    def is_spike(self, modality: str, loss: float) -> bool:
        limit = self.limit(modality)
        return limit is not None and loss > limit

    def add(self, modality: str, loss: float) -> None:
        self.losses.setdefault(modality, deque(maxlen=self.window)).append(loss)

    def state_dict(self) -> dict:
        return {m: list(d) for m, d in self.losses.items()}

    def load_state_dict(self, state: dict) -> None:
        self.losses = {m: deque(v, maxlen=self.window) for m, v in state.items()}


@dataclass
class BadStepPolicy:
    """Counts bad steps: ``total`` over the run (carried by checkpoints), ``in_a_row`` ending at the last one.
    A replay after a rollback repeats good steps: only a good step after the last bad one (``last_bad``) ends a
    row, so rollbacks that make no progress still reach ``max_in_a_row``."""
    max_in_a_row: int
    total: int = 0
    in_a_row: int = 0
    last_bad: int = 0
    rollbacks: list[int] = field(default_factory=list)  # the steps rolled back to

    def observe(self, reason: str | None, step: int | None = None) -> bool:
        """Count one step (``reason``: None for a good one); True when the run must stop."""
        if reason is None:
            if step is None or step > self.last_bad:
                self.in_a_row = 0
            return False
        self.total += 1
        self.in_a_row += 1
        self.last_bad = max(self.last_bad, step or 0)
        return self.in_a_row >= self.max_in_a_row

    def state_dict(self) -> dict:
        return {"total": self.total, "in_a_row": self.in_a_row, "last_bad": self.last_bad,
                "rollbacks": list(self.rollbacks)}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.in_a_row = state.get("total", 0), state.get("in_a_row", 0)
        self.last_bad, self.rollbacks = state.get("last_bad", 0), list(state.get("rollbacks", []))


def offending_rows(row_losses: list[float], limit: float | None) -> list[int]:
    """The rows a bad step is blamed on: those whose own loss (per supervised token, from a forward re-run) is not
    finite or above the spike ``limit``; none stand out: every row (the step as a whole)."""
    bad = [i for i, x in enumerate(row_losses) if not math.isfinite(x) or (limit is not None and x > limit)]
    return bad or list(range(len(row_losses)))


def row_losses(model, ctx, batch) -> list[tuple[list[tuple[int, int]], float]]:
    """Every row of the global step with its samples and its own loss per supervised token, from a forward re-run
    of the step (collective: each dp rank scores its rows, the world gathers them; dp rank order)."""
    scores = model.score_rows(batch.microbatches)
    losses = (scores[:, 0] / scores[:, 1].clamp(min=1)).tolist()
    mine = (ctx.dp_rank, batch.samples, losses)
    gathered = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    by_dp: dict[int, tuple] = {}
    for dp, rows, ls in gathered:  # tp and pp ranks of one replica hold the same rows
        by_dp.setdefault(dp, (rows, ls))
    return [(row, loss) for dp in sorted(by_dp) for row, loss in zip(*by_dp[dp])]
