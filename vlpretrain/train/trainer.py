"""The training loop: read it top to bottom.

check layout + data -> start processes -> this rank's model share (pipeline stages, TP, FSDP) -> previous
stage's weights -> optimizer over trainable parameters -> for each step: forward/backward over the
microbatches, clip by the global norm, step, log, checkpoint -> evaluate.
The same code runs a single process (every degree 1, no collective) and any torchrun layout.
"""
from __future__ import annotations

import base64
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vlpretrain.config import Config, ConfigError, trainable_parts
from vlpretrain.data.loader import DataPipeline, resolve
from vlpretrain.data.tokenizer import TextTokenizer
from vlpretrain.errors import UserError
from vlpretrain.eval.evaluator import Evaluator
from vlpretrain.eval.mcppl import check_eval_file
from vlpretrain.models.flops import step_flops
from vlpretrain.checkpoint.pretrained import load_pretrained_parts
from vlpretrain.parallel.engine import ParallelModel
from vlpretrain.parallel.launch_env import global_rank
from vlpretrain.parallel.mesh import init_parallel, local_device, resolve_layout, world_size_from_env
from vlpretrain.checkpoint.sharded_weights import write_full_weights
from vlpretrain.checkpoint.weights import find_weights, load_weights, verified
from vlpretrain.checkpoint.dcp import TRAIN_STATE, Checkpointer, find_resumable
from vlpretrain.checkpoint.integrity import check_checkpoint_room
from vlpretrain.train import faults
from vlpretrain.train.metrics import MetricsLogger, PeakMemory, device_peak_tflops
from vlpretrain.train.optim import build_optimizer, lr_multiplier
from vlpretrain.train.profiling import StepProfiler
from vlpretrain.train.preemption import EXIT_PREEMPTED, PREEMPTED_MARKER, PREEMPTION, Deadline
from vlpretrain.train.rundir import RunDirLock


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
    if cfg.checkpoint.resume:  # checked on every rank alike (a shared file system): the same answer everywhere
        resume = find_resumable(checkpoint_dir(cfg), cfg.checkpoint.resume,
                                move_damaged=global_rank() == 0)  # one rank moves them aside
    check_checkpoint_room(cfg, checkpoint_dir(cfg), Path(tc.run_dir))  # writable, room: not at the first save
    for key in ("llm", "siglip", "sam"):
        path = getattr(tc.pretrained, key)
        if path and not Path(path).exists():
            raise FileNotFoundError(f"train.pretrained.{key} not found: {path}")
    return tokenizer, (eval_path, text_path), init_file, resume


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.train.run_dir) / "checkpoints"


def train(cfg: Config) -> dict:
    """One stage, start to end; under torchrun/srun every rank runs it. Exits 42 when preempted."""
    with PREEMPTION.handling(cfg.train.preempt_signals):  # the CLI did it already, before torch was imported
        tokenizer, eval_paths, init_file, resume = _check_inputs(cfg)
        run_dir = Path(cfg.train.run_dir)
        lock = RunDirLock(run_dir)
        if global_rank() == 0:  # before any process group: a second job on this run dir stops here
            lock.acquire()
        try:
            return _train(cfg, tokenizer, eval_paths, init_file, resume, lock)
        finally:
            lock.release()


def _train(cfg: Config, tokenizer, eval_paths, init_file, resume, lock: RunDirLock) -> dict:
    t_start = time.perf_counter()
    tc = cfg.train
    resumed = json.loads((resume / TRAIN_STATE).read_text()) if resume else None
    device = local_device(cfg)
    ctx = init_parallel(cfg, device, mix=_step_mix(cfg))
    torch.manual_seed(tc.seed)  # weights and data order do not use it (they hash the seed); other randomness does
    lay = ctx.layout
    run_dir = Path(tc.run_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)

    # ---- data: every rank follows the same global sample sequence and keeps its dp slice
    data = DataPipeline(cfg, tokenizer, dp_rank=ctx.dp_rank, dp_size=lay.dp,  # opens every source now
                        state=resumed["data_state"] if resumed else None)
    model = ParallelModel(cfg, ctx)
    evaluator = Evaluator(cfg, tokenizer, *eval_paths)  # MCPPL + held-out text, in this layout
    data.load_images = model.has_first  # only ranks that run the vision encoder decode images
    if cfg.parallel.vision_split == "images":  # and each TP rank only the images it encodes
        data.image_split = (ctx.tp_rank, lay.tp)
    batches = data.steps(pin_memory=device.type == "cuda")

    # ---- weights, optimizer
    # each rank reads only the tensors of its stages, and of those only the TP / FSDP slices it holds
    if init_file is not None:
        for m in model.modules:
            load_weights(m, init_file)
    pre = tc.pretrained
    if pre.llm or pre.siglip or pre.sam:
        for m in model.modules:
            load_pretrained_parts(m, llm=pre.llm or None, siglip=pre.siglip or None, sam=pre.sam or None)
    # one optimizer per model part (pipeline stages of this rank), so that checkpoints key every state by
    # parameter name and load into any layout; a part without trainable parameters has none
    optimizers = [build_optimizer([p for p in m.parameters() if p.requires_grad], tc)[0]
                  if any(p.requires_grad for p in m.parameters()) else None for m in model.modules]
    ckpt = Checkpointer(checkpoint_dir(cfg), model.modules, optimizers, cfg.checkpoint.keep_last, ctx.is_main,
                        async_save=cfg.checkpoint.async_save)
    start, consumed = 0, 0
    if resume is not None:
        state = ckpt.load(resume)
        start, consumed = state["step"], state["consumed_samples"]
        _set_rng_state(state.get("rng"))
        if ctx.is_main:
            print(f"resumed from {resume} (step {start}, saved in layout {state['layout']})", flush=True)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: lr_multiplier(i, tc), last_epoch=-1)
                  for o in optimizers if o is not None]
    for sch in schedulers:  # the schedule is a function of the step: resume by moving to it
        for _ in range(start):
            sch.step()
    deadline = Deadline(tc.max_wall_time, tc.exit_margin_s, PREEMPTION.t0)
    trainable = trainable_parts(cfg)
    peak = device_peak_tflops(cfg, device)
    logger = MetricsLogger(cfg, run_dir, tc.steps, is_main=ctx.is_main, resume_step=start)
    memory = PeakMemory(device, cfg.logging.log_interval)  # GPU only: peak memory per log interval
    profiler = StepProfiler(cfg, run_dir, ctx, model)  # train.profile.steps: traces + pipeline timeline
    if ctx.is_main:
        print(f"training stage {tc.stage} ({'+'.join(trainable)}) of {cfg.model.name} on {device}: "
              f"{tc.steps} steps x {tc.global_batch_size} samples x {tc.seq_len} tokens; layout dp={lay.dp} "
              f"tp={lay.tp} pp={lay.pp} vpp={lay.vpp} split={model.split}", flush=True)

    def train_state() -> dict:
        return {"consumed_samples": consumed, "data_state": data_state, "config": cfg.to_dict(),
                "layout": [lay.dp, lay.tp, lay.pp, lay.vpp], "split": model.split, "rng": _rng_state()}

    def stop_here(step: int, save: bool = True):
        """Preempted: every rank saves this step (unless it is saved already) and exits 42 together."""
        if save:
            ckpt.save(step, train_state())
        ckpt.wait()
        logger.close()
        if ctx.is_main:
            (run_dir / PREEMPTED_MARKER).write_text(json.dumps(
                {"step": step, "reason": PREEMPTION.signal_name or "deadline", "time": time.time()}))
            print(f"preempted ({PREEMPTION.signal_name or 'deadline'}): saved step {step}; exiting with "
                  f"{EXIT_PREEMPTED}", flush=True)
        if dist.is_initialized():
            dist.barrier()  # the marker exists before any rank exits (srun --kill-on-bad-exit)
            dist.destroy_process_group()
        raise SystemExit(EXIT_PREEMPTED)

    # ---- the loop
    first_loss, loss, data_state = None, None, data.state_dict()
    if start >= tc.steps and ctx.is_main:
        print(f"nothing to train: the checkpoint is at step {start} and train.steps is {tc.steps}", flush=True)
    elif _preempted(ctx, deadline):  # a signal during start-up: a step-`start` checkpoint, then exit
        stop_here(start, save=resume is None)
    for step in range(start + 1, tc.steps + 1):
        t0 = time.perf_counter()
        profiler.before(step)
        batch = next(batches)
        data_state = batch.data_state
        loss = model.forward_backward(batch.microbatches, batch.num_label_tokens)
        faults.inject(step, ctx.rank, run_dir)
        grad_norm = model.clip_grad_norm_(tc.grad_clip)
        lr = tc.lr * lr_multiplier(step - 1, tc)
        for opt in optimizers:
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        for sch in schedulers:
            sch.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        profiler.after(step)

        consumed += batch.num_samples
        first_loss = loss if first_loss is None else first_loss
        flops = step_flops(cfg.model, tc.global_batch_size, tc.seq_len, batch.num_images, trainable).total
        flops_per_device = flops / lay.world_size
        logger.log({
            "step": step, "loss": loss, "modality": batch.modality, "lr": lr, "grad_norm": grad_norm,
            "tokens": batch.num_tokens, "tokens_per_s": batch.num_tokens / dt, "step_time_s": dt,
            "model_tflops": flops_per_device / dt / 1e12, "mfu": flops_per_device / dt / 1e12 / peak,
            "consumed_samples": consumed, "images": batch.num_images,
            "language_ratio_target": batch.language_ratio_target,
            "language_ratio_realized": batch.language_ratio_realized, "samples_digest": batch.samples_digest,
            "source_counts": batch.source_counts, "bad_samples": batch.bad_samples, "bad_images": batch.bad_images,
            "skipped_samples": sum(data_state["bad_total"].values()), **memory.record(step),
        })
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}")
        lock.refresh()
        deadline.observe(step_s=dt)
        if step < tc.steps and _preempted(ctx, deadline):  # a signal or the deadline: save this step, exit
            stop_here(step)
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < tc.steps:
            t_save = time.perf_counter()
            ckpt.save(step, train_state())
            deadline.observe(save_s=time.perf_counter() - t_save)
            if _preempted(ctx, deadline):  # arrived during the save: it is complete, so just exit
                stop_here(step, save=False)
        if evaluator and tc.eval_interval and step % tc.eval_interval == 0 and step < tc.steps:
            logger.log_eval(step, evaluator.run(model))

    if start < tc.steps:  # the final checkpoint also carries the full weights (init_from, eval, export)
        ckpt.save(tc.steps, train_state(),  # streamed: no rank holds more than its share + one tensor
                  weights=lambda path: write_full_weights(model.modules, ctx, path, {"step": str(tc.steps)}))
    summary = {"steps": tc.steps, "first_loss": first_loss, "final_loss": loss,
               "wall_time_s": round(time.perf_counter() - t_start, 2), "skipped_samples": data_state["bad_total"],
               "checkpoint": str(checkpoint_dir(cfg))}
    if evaluator and start < tc.steps:
        summary["eval"] = logger.log_eval(tc.steps, evaluator.run(model))
    logger.close()
    if ctx.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
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


def _rng_state() -> dict:
    """The RNG states (every rank seeds alike and draws alike, so rank 0's stand for all)."""
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict | None) -> None:
    if not state:
        return
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _preempted(ctx, deadline: Deadline) -> bool:
    """Did any rank get a preemption signal, or has the deadline come (rank 0's clock decides)? All ranks
    get the same answer."""
    want = PREEMPTION.requested or (ctx.is_main and deadline.reached())
    if not dist.is_initialized():
        return want
    t = torch.tensor([1.0 if want else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
