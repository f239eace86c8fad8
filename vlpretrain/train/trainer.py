"""The training loop: read it top to bottom.

check layout + data -> start processes -> this rank's model share (pipeline stages, TP, FSDP) -> previous
stage's weights -> optimizer over trainable parameters -> for each step: forward/backward over the
microbatches, clip by the global norm, step, log, checkpoint -> evaluate.
The same code runs a single process (every degree 1, no collective) and any torchrun layout.

``train`` checks the inputs and holds the run dir; ``_build`` makes a ``Run`` (everything one run holds,
``run_state.py``); ``_loop`` does ``_train_step`` (one optimizer step) -> log -> a bad step's handling (skip,
roll back and replay, or stop: ``recovery.py``) -> preemption check (save, exit 42) -> checkpoint -> evaluate
for every step; ``_finish`` writes the final checkpoint, evaluation and summary.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vlpretrain.checkpoint.dcp import TRAIN_STATE, Checkpointer, NonFiniteStateError, find_resumable
from vlpretrain.checkpoint.integrity import check_checkpoint_room
from vlpretrain.checkpoint.pretrained import load_pretrained_parts
from vlpretrain.checkpoint.sharded_weights import write_full_weights
from vlpretrain.checkpoint.weights import find_weights, load_weights, verified
from vlpretrain.config import Config, ConfigError, TrainConfig, trainable_parts
from vlpretrain.data.loader import DataPipeline, GlobalBatch, resolve
from vlpretrain.data.tokenizer import TextTokenizer
from vlpretrain.errors import UserError
from vlpretrain.eval.evaluator import Evaluator
from vlpretrain.eval.mcppl import check_eval_file
from vlpretrain.models.flops import step_flops
from vlpretrain.parallel.engine import ParallelModel
from vlpretrain.parallel.launch_env import global_rank
from vlpretrain.parallel.mesh import init_parallel, local_device, resolve_layout, world_size_from_env
from vlpretrain.parallel.peers import gather_peers
from vlpretrain.parallel.pipeline_cost import row_cost
from vlpretrain.train import faults, tower_cache
from vlpretrain.train.bad_steps import (
    DIVERGED_MARKER,
    EXIT_DIVERGED,
    LOSS_SPIKE,
    NONFINITE_LOSS,
    step_flags,
)
from vlpretrain.train.lost_processes import lost_process
from vlpretrain.train.metrics import MetricsLogger, PeakMemory, device_peak_tflops
from vlpretrain.train.optim import build_optimizer, lr_multiplier
from vlpretrain.train.preemption import EXIT_PREEMPTED, PREEMPTED_MARKER, PREEMPTION, Deadline
from vlpretrain.train.profiling import StepProfiler
from vlpretrain.train.recovery import bad_step, diverged, own_bad_images
from vlpretrain.train.run_state import Run, restore_progress, set_rng_state, train_state
from vlpretrain.train.rundir import RunDirLock, move_previous_run_aside, previous_run

VANISHED_GRAD, VANISHED_STEPS = 1e-4, 3  # a gradient norm under 1e-4 x the first one, 3 steps in a row: warn


def _check_inputs(cfg: Config) -> tuple[TextTokenizer, tuple[Path | None, Path | None], Path | None, Path | None]:
    """Everything a user can get wrong, checked before any process group or model exists. Returns the
    tokenizer, the eval files (MCPPL, text), the init_from weights and the checkpoint to resume from."""
    tc = cfg.train
    resolve_layout(cfg, world_size_from_env())
    tokenizer = TextTokenizer(resolve(cfg.data.root, cfg.data.tokenizer))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"config error: model.vocab_size={cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.vocab_size}")
    if tokenizer.image_id != cfg.model.image_token_id:
        raise ConfigError(f"config error: model.image_token_id={cfg.model.image_token_id} but the tokenizer's "
                          f"<image_placeholder> is {tokenizer.image_id}")
    eval_path = resolve(cfg.data.root, tc.eval_file) if tc.eval_file else None
    if eval_path is not None and not eval_path.is_file():
        raise FileNotFoundError(f"train.eval_file not found: {eval_path}")
    check_eval_file(eval_path, cfg, tokenizer)  # fields, images, lengths: fail now, not after training
    text_path = resolve(cfg.data.root, tc.eval_text) if tc.eval_text else None
    if text_path is not None and not (text_path.is_file() or Path(f"{text_path}.idx").is_file()):
        raise FileNotFoundError(f"train.eval_text not found: {text_path}")
    init_file = verified(find_weights(tc.init_from)) if tc.init_from else None  # checksums, before any work
    resume = None
    if cfg.checkpoint.resume and cfg.checkpoint.overwrite:
        raise ConfigError(f"config error: checkpoint.resume={cfg.checkpoint.resume} continues the run, "
                          "checkpoint.overwrite=true starts it over: choose one")
    if cfg.checkpoint.resume:  # checked on every rank alike (a shared file system): the same answer everywhere
        resume = find_resumable(checkpoint_dir(cfg), cfg.checkpoint.resume,
                                move_damaged=global_rank() == 0)  # one rank moves them aside
    elif not cfg.checkpoint.overwrite and (previous := previous_run(Path(tc.run_dir), checkpoint_dir(cfg))):
        # never overwrite a run silently
        raise UserError(f"train.run_dir {tc.run_dir} already holds a run ({previous}): resume it with --resume "
                        "auto, choose another train.run_dir, or start over with --overwrite (--set "
                        "checkpoint.overwrite=true: the old run is moved aside)")
    check_checkpoint_room(cfg, checkpoint_dir(cfg), Path(tc.run_dir))  # writable, room: not at the first save
    for key in ("llm", "siglip", "sam"):
        path = getattr(tc.pretrained, key)
        if path and not Path(path).exists():
            raise FileNotFoundError(f"train.pretrained.{key} not found: {path}")
    return tokenizer, (eval_path, text_path), init_file, resume


def _refuse_retry_after_divergence(run_dir: Path) -> None:
    """torchrun --max-restarts restarts every rank after any failure: a run that diverged (exit 43) would diverge
    again. Stop such a restart at once; a run started by hand (or requeued on purpose) goes on."""
    marker = run_dir / DIVERGED_MARKER
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0 and marker.is_file():
        if global_rank() == 0:
            print(f"not retrying: this run diverged ({marker}: {marker.read_text(errors='replace').strip()}); "
                  "change what made it diverge and start it again by hand", flush=True)
        raise SystemExit(EXIT_DIVERGED)


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.train.run_dir) / "checkpoints"


def train(cfg: Config) -> dict:
    """One stage, start to end; under torchrun/srun every rank runs it. Exits 42 when preempted."""
    with PREEMPTION.handling(cfg.train.preempt_signals):  # the CLI did it already, before torch was imported
        tokenizer, eval_paths, init_file, resume = _check_inputs(cfg)
        run_dir = Path(cfg.train.run_dir)
        _refuse_retry_after_divergence(run_dir)
        lock = RunDirLock(run_dir)
        if global_rank() == 0:  # before any process group: a second job on this run dir stops here
            lock.acquire()
        try:
            if global_rank() == 0 and cfg.checkpoint.overwrite:  # only once the run dir is ours
                move_previous_run_aside(run_dir, checkpoint_dir(cfg))
            t_start = time.perf_counter()
            run = _build(cfg, tokenizer, eval_paths, init_file, resume, lock)
            try:
                _loop(run)
                return _finish(run, t_start)
            except RuntimeError as e:  # a data worker or another rank lost: one line, not torch's traceback
                fault = lost_process(e, run.data, run.peers, run.ctx.rank, run.step, run.ckpt.dir)
                if fault is None:
                    raise
                raise fault from None
        finally:
            lock.release()


def _build(cfg: Config, tokenizer, eval_paths, init_file, resume, lock: RunDirLock) -> Run:
    """Processes, data, this rank's model share and its weights, optimizers, checkpointer (restored when
    resuming), loggers. Every rank builds the same things in the same order: several steps are collectives."""
    tc = cfg.train
    resumed = json.loads((resume / TRAIN_STATE).read_text()) if resume else None
    device = local_device(cfg)
    ctx = init_parallel(cfg, device, mix=_step_mix(cfg))
    torch.manual_seed(tc.seed)  # weights and data order do not use it (they hash the seed); other randomness does
    run_dir = Path(tc.run_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        (run_dir / DIVERGED_MARKER).unlink(missing_ok=True)  # a new attempt, started on purpose

    # data: every rank follows the same global sample sequence and keeps its dp slice
    data = DataPipeline(cfg, tokenizer, dp_rank=ctx.dp_rank, dp_size=ctx.layout.dp,  # opens every source now
                        state=resumed["data_state"] if resumed else None, row_cost=row_cost(cfg))
    if ctx.is_main:  # how the saved data state meets an edited data section (data/plan_state.py): once
        for line in data.resume_notes:
            print(f"resume: {line}", flush=True)
    model = ParallelModel(cfg, ctx)
    evaluator = Evaluator(cfg, tokenizer, *eval_paths)  # MCPPL + held-out text, in this layout
    data.load_images = model.has_first  # only ranks that run the vision encoder decode images
    if cfg.parallel.vision_split == "images":  # and each TP rank only the images it encodes
        data.image_split = (ctx.tp_rank, ctx.layout.tp)
    data.before_build = functools.partial(faults.in_worker, rank=ctx.rank, run_dir=run_dir)  # in data workers
    batches = data.steps(pin_memory=device.type == "cuda")

    _load_weights(model, tc, init_file)
    optimizers, schedulers = _build_optimizers(model, tc)
    ckpt = Checkpointer(checkpoint_dir(cfg), model.modules, optimizers, cfg.checkpoint.keep_last, ctx.is_main,
                        async_save=cfg.checkpoint.async_save)
    ckpt.check_finite = tc.check_finite  # refuse to save a state with non-finite tensors
    start, consumed = _resume(ckpt, resume, schedulers, ctx.is_main)
    cache = tower_cache.install(model.modules, tc.frozen_tower_cache_mb)  # after every weight is loaded
    run = Run(cfg=cfg, ctx=ctx, device=device, run_dir=run_dir, lock=lock, data=data, batches=batches, model=model,
              evaluator=evaluator, optimizers=optimizers, schedulers=schedulers, ckpt=ckpt,
              resumed=resume is not None, start=start, consumed=consumed,
              deadline=Deadline(tc.max_wall_time, tc.exit_margin_s, PREEMPTION.t0),
              trainable=trainable_parts(cfg), peak_tflops=device_peak_tflops(cfg, device),
              logger=MetricsLogger(cfg, run_dir, tc.steps, is_main=ctx.is_main, resume_step=start),
              memory=PeakMemory(device, cfg.logging.log_interval),  # GPU only: peak memory per log interval
              profiler=StepProfiler(cfg, run_dir, ctx, model),  # train.profile.steps: traces + pipeline timeline
              tower_cache=cache)
    if resumed:
        restore_progress(run, resumed)
    if ctx.is_main:
        lay = ctx.layout
        hsdp = f" (HSDP: {lay.dp_replicate} replicas x shard {lay.dp_shard})" if lay.dp_replicate > 1 else ""
        print(f"training stage {tc.stage} ({'+'.join(run.trainable)}) of {cfg.model.name} on {device}: "
              f"{tc.steps} steps x {tc.global_batch_size} samples x {tc.seq_len} tokens; layout dp={lay.dp}{hsdp} "
              f"tp={lay.tp} pp={lay.pp} vpp={lay.vpp} split={model.split}", flush=True)
    run.data_state = data.state_dict()
    run.peers = gather_peers()  # after every process group exists: their connections are among the endpoints
    return run


def _load_weights(model: ParallelModel, tc: TrainConfig, init_file: Path | None) -> None:
    """The previous stage's weights and the pretrained towers / LLM: each rank reads only the tensors of its
    stages, and of those only the TP / FSDP slices it holds."""
    if init_file is not None:
        for m in model.modules:
            load_weights(m, init_file)
    pre = tc.pretrained
    if pre.llm or pre.siglip or pre.sam:
        for m in model.modules:
            load_pretrained_parts(m, llm=pre.llm or None, siglip=pre.siglip or None, sam=pre.sam or None)


def _build_optimizers(model: ParallelModel, tc: TrainConfig) -> tuple[list, list]:
    """One optimizer and LR schedule per model part (the pipeline stages of this rank), so that checkpoints key
    every state by parameter name and load into any layout; a part without trainable parameters has none."""
    optimizers, schedulers = [], []
    for m in model.modules:
        params = [p for p in m.parameters() if p.requires_grad]
        opt, sched = build_optimizer(params, tc) if params else (None, None)
        optimizers.append(opt)
        if sched is not None:
            schedulers.append(sched)
    return optimizers, schedulers


def _resume(ckpt: Checkpointer, resume: Path | None, schedulers: list, is_main: bool) -> tuple[int, int]:
    """Restore the checkpoint ``resume`` (if any): weights, optimizer states, RNG, and the LR schedules moved
    to its step. Returns (step, consumed samples)."""
    if resume is None:
        return 0, 0
    state = ckpt.load(resume)
    set_rng_state(state.get("rng"))
    for sched in schedulers:  # the schedule is a function of the step: resume by moving to it
        for _ in range(state["step"]):
            sched.step()
    if is_main:
        print(f"resumed from {resume} (step {state['step']}, saved in layout {state['layout']})", flush=True)
    return state["step"], state["consumed_samples"]


def _loop(run: Run) -> None:
    """For each step after ``start``: step -> log -> preemption check -> checkpoint -> evaluation. The last step
    saves and evaluates in ``_finish`` instead."""
    cfg, tc = run.cfg, run.cfg.train
    if run.start >= tc.steps:
        if run.ctx.is_main:
            print(f"nothing to train: the checkpoint is at step {run.start} and train.steps is {tc.steps}",
                  flush=True)
    elif _preempted(run.ctx, run.deadline):  # a signal during start-up: a step-`start` checkpoint, then exit
        _stop(run, run.start, save=not run.resumed)
    if run.evaluator and tc.eval_at_start and run.start == 0 and not run.resumed:  # the weights it starts from
        run.logger.log_eval(0, run.evaluator.run(run.model))
    step = run.start
    while step < tc.steps:
        step += 1
        run.step = step
        batch, loss, grad_norm, dt = _train_step(run, step)
        stop = _record(run, step, batch, loss, grad_norm, dt)
        run.lock.refresh()
        run.deadline.observe(step_s=dt)
        if run.bad_reason or stop:
            back = bad_step(run, step, batch, loss, grad_norm, stop)
            if back is not None:  # rolled back: replay from there
                step = back
                continue
        if step == tc.steps:  # the last step: _finish saves and evaluates it
            break
        if _preempted(run.ctx, run.deadline):  # a signal or the deadline: save this step, exit
            _stop(run, step)
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
            _save(run, step)
        if run.evaluator and tc.eval_interval and step % tc.eval_interval == 0:
            run.logger.log_eval(step, run.evaluator.run(run.model))


def _train_step(run: Run, step: int) -> tuple[GlobalBatch, float, float, float]:
    """One optimizer step: forward/backward over this rank's microbatches, clip by the global norm, step every
    optimizer and its LR schedule. A non-finite loss or gradient norm (every rank agrees: ``bad_steps``) skips
    the update: the gradients are dropped, the schedule still advances. Returns the batch, the loss, the
    gradient norm and the step time (s); ``run.bad_reason`` says why the update was skipped (None: it was not)."""
    t0 = time.perf_counter()
    run.profiler.before(step)
    batch = next(run.batches)
    faults.poison_samples(batch, run.data.source_names)
    loss = run.model.forward_backward(batch.microbatches, batch.num_label_tokens)
    faults.inject(step, run.ctx.rank, run.run_dir)  # after the backward, before the update
    loss = faults.poison(step, run.ctx.rank, loss)
    grad_norm = run.model.clip_grad_norm_(run.cfg.train.grad_clip)
    grad_norm = faults.poison(step, run.ctx.rank, grad_norm, "grad")
    run.bad_reason = None
    if run.cfg.train.check_finite:
        run.bad_reason, batch.bad_images = step_flags(loss, grad_norm, own_bad_images(run, batch), run.device)
        if run.bad_reason is None and run.history.is_spike(batch.modality, loss):
            run.bad_reason = LOSS_SPIKE
    for opt in run.optimizers:
        if opt is not None:
            if run.bad_reason is None:
                opt.step()
            opt.zero_grad(set_to_none=True)
    for sched in run.schedulers:
        sched.step()
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    dt = time.perf_counter() - t0
    run.profiler.after(step)
    return batch, loss, grad_norm, dt


def _record(run: Run, step: int, batch: GlobalBatch, loss: float, grad_norm: float, dt: float) -> bool:
    """Count the step into the run's progress and log its metrics line (a bad step's too). True: the run must
    stop (``train.max_bad_steps`` bad steps in a row, or a non-finite loss without checks)."""
    cfg, tc = run.cfg, run.cfg.train
    run.data_state = batch.data_state
    run.consumed += batch.num_samples
    run.bad_images += batch.bad_images
    reason = run.bad_reason if tc.check_finite else (None if math.isfinite(loss) else NONFINITE_LOSS)
    run.bad_reason = reason
    stop = run.bad_steps.observe(reason, step) or (reason is not None and not tc.check_finite)
    if reason is None:
        run.first_loss = loss if run.first_loss is None else run.first_loss
        run.loss = loss
        run.history.add(batch.modality, loss)
    _watch_vanished_gradients(run, step, batch, grad_norm)
    flops = step_flops(cfg.model, tc.global_batch_size, tc.seq_len, batch.num_images, run.trainable).total
    tflops_per_device = flops / run.ctx.layout.world_size / dt / 1e12
    run.logger.log({
        "step": step, "loss": loss, "modality": batch.modality, "lr": tc.lr * lr_multiplier(step - 1, tc),
        "grad_norm": grad_norm, "tokens": batch.num_tokens, "tokens_per_s": batch.num_tokens / dt,
        "step_time_s": dt, "model_tflops": tflops_per_device, "mfu": tflops_per_device / run.peak_tflops,
        "consumed_samples": run.consumed, "images": batch.num_images,
        "language_ratio_target": batch.language_ratio_target,
        "language_ratio_realized": batch.language_ratio_realized, "samples_digest": batch.samples_digest,
        "source_counts": batch.source_counts, "bad_samples": batch.bad_samples, "bad_images": batch.bad_images,
        "skipped_samples": sum(run.data_state["bad_total"].values()), "bad_steps": run.bad_steps.total,
        "rank_cost_imbalance": batch.rank_cost_imbalance,
        "rank_cost_imbalance_contiguous": batch.rank_cost_imbalance_contiguous,
        **({"bad_step_reason": reason} if reason else {}), **run.memory.record(step),
    })
    return stop


def _watch_vanished_gradients(run: Run, step: int, batch: GlobalBatch, grad_norm: float) -> None:
    """Warn when the gradient norm stays under VANISHED_GRAD x the run's first one on steps that reach the
    trainable parts (a text step gives the vision side none): nothing is learning, e.g. activations saturated by
    a too-large update (the issue's stage 1 at lr 1e4: 2.6, then 6e-6 for every step, the loss flat)."""
    if batch.modality == "text" and all(p in ("siglip", "sam", "adaptor") for p in run.trainable):
        return
    if run.first_grad_norm is None:
        run.first_grad_norm = grad_norm if math.isfinite(grad_norm) and grad_norm > 0 else None
        return
    run.vanished_steps = run.vanished_steps + 1 if grad_norm < VANISHED_GRAD * run.first_grad_norm else 0
    if run.vanished_steps == VANISHED_STEPS and run.ctx.is_main:
        print(f"warning: the gradient norm has vanished for {VANISHED_STEPS} steps (steps {step - VANISHED_STEPS + 1}"
              f"-{step}: {grad_norm:.2g}, the first step's {run.first_grad_norm:.2g}): "
              f"nothing is learning; saturated activations after a too-large update (train.lr={run.cfg.train.lr})?",
              flush=True)


def _save(run: Run, step: int) -> None:
    """An interval checkpoint; its duration feeds the deadline. A preemption that arrived during the save finds
    it complete: then just exit."""
    t_save = time.perf_counter()
    try:
        run.ckpt.save(step, train_state(run))
    except NonFiniteStateError as e:  # a diverged state: exit 43
        diverged(run, step, str(e))
    run.deadline.observe(save_s=time.perf_counter() - t_save)
    if _preempted(run.ctx, run.deadline):
        _stop(run, step, save=False)


def _stop(run: Run, step: int, save: bool = True) -> None:
    """Preempted: every rank saves this step (unless it is saved already) and exits 42 together."""
    if save:
        run.ckpt.save(step, train_state(run))
    run.ckpt.wait()
    run.logger.close()
    reason = PREEMPTION.signal_name or "deadline"
    if run.ctx.is_main:
        (run.run_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": step, "reason": reason, "time": time.time()}))
        print(f"preempted ({reason}): saved step {step}; exiting with {EXIT_PREEMPTED}", flush=True)
    if dist.is_initialized():
        dist.barrier()  # the marker exists before any rank exits (srun --kill-on-bad-exit)
        dist.destroy_process_group()
    raise SystemExit(EXIT_PREEMPTED)


def _finish(run: Run, t_start: float) -> dict:
    """The final checkpoint (with the full weights: init_from, eval, export) and evaluation, the summary."""
    cfg, tc, ctx = run.cfg, run.cfg.train, run.ctx
    if run.start < tc.steps:  # streamed: no rank holds more than its share + one tensor
        try:
            run.ckpt.save(tc.steps, train_state(run), weights=lambda path: write_full_weights(
                run.model.modules, ctx, path, {"step": str(tc.steps)}))
        except NonFiniteStateError as e:
            diverged(run, tc.steps, str(e))
    summary = {"steps": tc.steps, "first_loss": run.first_loss, "final_loss": run.loss,
               "wall_time_s": round(time.perf_counter() - t_start, 2),
               "skipped_samples": run.data_state["bad_total"], "bad_images": run.bad_images,
               "bad_steps": run.bad_steps.total, "checkpoint": str(checkpoint_dir(cfg))}
    if run.evaluator and tc.eval_at_end and run.start < tc.steps:
        summary["eval"] = run.logger.log_eval(tc.steps, run.evaluator.run(run.model))
    if run.tower_cache is not None:  # rank 0's: images kept, memory, share of tower calls served
        summary["frozen_tower_cache"] = run.tower_cache.stats()
    run.logger.close()
    if ctx.is_main:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _step_mix(cfg: Config):
    """The step types ``layer_split: auto`` balances: measured from the data by sampling the run's own planner
    (deterministic, so every rank gets the same split), or the assumed mix where that fails."""
    p = cfg.parallel
    if p.pp == 1 or p.layer_split != "auto":
        return None
    from vlpretrain.data.step_mix import measured_mix

    try:
        return measured_mix(cfg)
    except (UserError, OSError, ValueError) as e:
        print(f"warning: layer_split auto uses the assumed step mix ({str(e).splitlines()[0]})", flush=True)
        return None


def _preempted(ctx, deadline: Deadline) -> bool:
    """Did any rank get a preemption signal, or has the deadline come (rank 0's clock decides)? All ranks
    get the same answer."""
    want = PREEMPTION.requested or (ctx.is_main and deadline.reached())
    if not dist.is_initialized():
        return want
    t = torch.tensor([1.0 if want else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
