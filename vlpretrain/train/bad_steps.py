"""Bad steps: a step whose loss or global gradient norm is not finite is skipped, counted, and ends the run
after ``train.max_bad_steps`` of them in a row (exit 43), without saving the state it diverged into.

A skipped step applies no update (the gradients are dropped) but still counts as a step: its data is consumed,
its metrics line is written (``bad_step_reason``, ``bad_steps``) and the LR schedule advances. Megatron keeps the
schedule where it was on a skipped update; here the LR is a function of the step number (resume moves the
schedule to the checkpoint's step, the metrics log ``lr_multiplier(step - 1)``), so advancing it keeps a resumed
run and the logged LR identical to an uninterrupted one.

Every rank reaches the same decision: the loss ``forward_backward`` returns is reduced over pp and dp and the
gradient norm over dp, tp and pp, and the flags are OR-ed over the world anyway (one tiny all-reduce), so no
rank steps its optimizer while another skips. Later: roll back / replay, spike detection, attribution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

EXIT_DIVERGED = 43  # beside EXIT_PREEMPTED (42): too many bad steps in a row; nothing of the bad state was saved
NONFINITE_LOSS, NONFINITE_GRAD = "non-finite loss", "non-finite grad norm"


def bad_step_reason(loss: float, grad_norm: float, device: torch.device | None = None) -> str | None:
    """Why this step must not update the weights (None: it may). Collective when a process group is up."""
    flags = [0.0 if math.isfinite(loss) else 1.0, 0.0 if math.isfinite(grad_norm) else 1.0]
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(flags, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flags = t.tolist()
    if flags[0]:
        return NONFINITE_LOSS
    if flags[1]:
        return NONFINITE_GRAD
    return None


@dataclass
class BadStepPolicy:
    """Counts bad steps: ``total`` over the run (since its start or resume), ``in_a_row`` ending at the last."""
    max_in_a_row: int
    total: int = 0
    in_a_row: int = 0

    def observe(self, reason: str | None) -> bool:
        """Count one step (``reason``: None for a good one); True when the run must stop."""
        if reason is None:
            self.in_a_row = 0
            return False
        self.total += 1
        self.in_a_row += 1
        return self.in_a_row >= self.max_in_a_row
