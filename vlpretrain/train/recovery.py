"""After a bad step (``bad_steps``): blame its samples, record them, then skip, roll back and replay, or stop
(exit 43, leaving ``<run_dir>/DIVERGED``). Every function here is collective: every rank calls it alike."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch.distributed as dist

from vlpretrain.checkpoint.dcp import find_resumable
from vlpretrain.data.loader import GlobalBatch
from vlpretrain.files import write_json_atomic
from vlpretrain.train.bad_steps import (
    DIVERGED_MARKER,
    EXIT_DIVERGED,
    LOSS_SPIKE,
    NONFINITE_LOSS,
    offending_rows,
    row_losses,
)
from vlpretrain.train.metrics import json_line
from vlpretrain.train.run_state import Run, set_rng_state


def own_bad_images(run: Run, batch: GlobalBatch) -> int:
    """This rank's undecodable images, counted once over the world: every TP rank decodes its own share with the
    TP image split, else TP rank 0 stands for its group."""
    return batch.bad_images if run.cfg.parallel.vision_split == "images" or run.ctx.tp_rank == 0 else 0


def bad_step(run: Run, step: int, batch: GlobalBatch, loss: float, grad_norm: float, stop: bool) -> int | None:
    """After a bad step (its update was skipped): blame its rows (a forward re-run of the step: rows whose own
    loss is not finite or spikes, else all), write them to ``<run_dir>/bad_steps.jsonl``, and act on
    ``train.on_bad_step``: skip (the blamed samples, where rows stood out, are not drawn again), rollback (returns
    the step to replay from) or stop. Collective."""
    tc = run.cfg.train
    limit = run.history.limit(batch.modality) if run.bad_reason == LOSS_SPIKE else None
    rows = row_losses(run.model, run.ctx, batch) if run.bad_reason else []
    blamed = offending_rows([x for _, x in rows], limit)
    action = "stop" if stop or tc.on_bad_step == "stop" else tc.on_bad_step
    target = None
    if action == "rollback":
        run.ckpt.wait()
        target = find_resumable(run.ckpt.dir, "auto")
        if target is None:
            action = "skip"  # nothing to go back to yet
    # skipping a step none of whose rows stood out: its samples may be drawn again (the step as a whole was bad)
    taken = [] if action == "skip" and len(blamed) == len(rows) else blamed
    samples = sorted({s for r in taken for s in rows[r][0]})
    if run.ctx.is_main and rows:
        write_bad_step(run, step, batch, loss, grad_norm, rows, set(blamed), action, target)
    if action == "stop":
        diverged(run, step, why_stop(run, step))
    names = run.data.source_names
    run.excluded += [x for x in ((names[s], i) for s, i in samples) if x not in run.excluded]
    if action == "skip":
        if samples:  # re-planned from right after this step: the same steps whatever was planned ahead
            _replan(run, run.data_state)
        if run.ctx.is_main:
            print(f"bad step {step} ({run.bad_reason}): update skipped; {len(samples)} samples will not be drawn "
                  f"again (bad_steps.jsonl)", flush=True)
        return None
    return rollback(run, step, target)


def write_bad_step(run: Run, step: int, batch: GlobalBatch, loss: float, grad_norm: float, rows: list,
                    blamed: set[int], action: str, target: Path | None) -> None:
    """One line of ``<run_dir>/bad_steps.jsonl``: the step, why, what was done and every sample of it (source,
    file or shard, key, modality, tokens, images; its row's loss, whether it was blamed)."""
    samples = [{**run.data.describe(s, i), "row": r, "row_loss": x, "blamed": r in blamed}
               for r, (row, x) in enumerate(rows) for s, i in row]
    record = {"step": step, "reason": run.bad_reason, "loss": loss, "grad_norm": grad_norm,
              "modality": batch.modality, "action": action, "rollback_to": str(target) if target else None,
              "spike_limit": run.history.limit(batch.modality), "samples": samples}
    with open(run.run_dir / "bad_steps.jsonl", "a", encoding="utf-8") as f:
        f.write(json_line(record))
        f.flush()
        os.fsync(f.fileno())


def rollback(run: Run, step: int, target: Path) -> int:
    """Back to checkpoint ``target``: weights, optimizer states, RNG, LR schedule, loss history and data state as
    saved, minus every sample a rollback blamed so far; the metrics after it are dropped (the replay logs them
    again). Returns its step. The replay is exact: a run that never drew those samples trains the same weights."""
    state = run.ckpt.load(target)
    set_rng_state(state.get("rng"))
    for sched in run.schedulers:  # the schedule is a function of the step
        sched.last_epoch = state["step"] - 1
        sched.step()
    _replan(run, state["data_state"])
    run.consumed = state["consumed_samples"]
    run.history.load_state_dict(state.get("progress", {}).get("loss_history", {}))
    run.bad_steps.rollbacks.append(state["step"])
    run.logger.rewind(state["step"])
    if run.ctx.is_main:
        print(f"bad step {step} ({run.bad_reason}): rolled back to step {state['step']} ({target}); "
              f"{len(run.excluded)} samples will not be drawn again (bad_steps.jsonl); replaying", flush=True)
    return state["step"]


def why_stop(run: Run, step: int) -> str:
    tc, reason = run.cfg.train, run.bad_reason or NONFINITE_LOSS
    if not tc.check_finite:
        return f"{reason} at step {step} (train.check_finite=false: no step is skipped)"
    if run.bad_steps.in_a_row >= tc.max_bad_steps:
        return (f"{run.bad_steps.in_a_row} bad steps in a row ({reason} at step {step}; "
                f"train.max_bad_steps={tc.max_bad_steps})")
    return f"bad step {step} ({reason}; train.on_bad_step=stop)"


def diverged(run: Run, step: int, what: str) -> None:
    """The run cannot go on (``what``): every rank exits 43 together, leaving ``<run_dir>/DIVERGED`` so that a
    launcher's automatic restart does not retry it; the state is not saved (a pending asynchronous save, of an
    earlier good step, is finished)."""
    run.ckpt.wait()
    run.logger.close()
    if run.ctx.is_main:
        last = run.ckpt.dir / "latest"
        kept = f"the last checkpoint is {last.read_text().strip()}" if last.is_file() else "no checkpoint was saved"
        write_json_atomic(run.run_dir / DIVERGED_MARKER, {"step": step, "reason": what, "time": time.time()})
        print(f"diverged: {what}; not saving; {kept}; exiting with {EXIT_DIVERGED}", flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    raise SystemExit(EXIT_DIVERGED)


def _replan(run: Run, data_state: dict) -> None:
    """Plan the coming steps again from ``data_state``, never drawing ``run.excluded``; the steps planned ahead
    (DataLoader workers) are dropped."""
    run.batches = None  # stops the workers of the abandoned steps
    run.data.load_state_dict(data_state)
    where = {name: s for s, name in enumerate(run.data.source_names)}  # a source gone since: nothing to exclude
    run.data.exclude([(where[name], i) for name, i in run.excluded if name in where])
    run.batches = run.data.steps(pin_memory=run.device.type == "cuda")
    run.data_state = run.data.state_dict()
