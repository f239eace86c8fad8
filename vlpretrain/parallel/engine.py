"""This rank's share of the model under a (dp, tp, pp, vpp) layout, and one optimizer step's forward/backward.

Order of application, as in torchtitan: cut pipeline stages (meta device), then ``parallelize_part`` on each:
tensor parallel (+ image split) -> activation checkpointing -> compile -> FSDP2 -> materialise and initialise.
With every degree 1 this is the plain single-process model and loop: the same code path, no collective.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel

from vlpretrain.config import Config, trainable_parts
from vlpretrain.models.init import initial_values
from vlpretrain.models.te import enable_fp8
from vlpretrain.models.vlm import build_model, set_trainable
from vlpretrain.parallel.activation_checkpointing import apply_activation_checkpointing
from vlpretrain.parallel.fsdp import (
    apply_fsdp,
    keep_gathered_between_microbatches,
    prepare_unsharded_params,
    reshard_all,
)
from vlpretrain.parallel.mesh import ParallelContext
from vlpretrain.parallel.pipeline import PackedStage, build_schedule, cut_stage, run_microbatches, stage_specs
from vlpretrain.parallel.tensor import apply_tensor_parallel
from vlpretrain.parallel.vision_split import apply_vision_split, reduce_first_stage_grads


def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) value into a parameter that may be a DTensor shard: each rank slices its own
    part locally (the full value is identical on every rank, so no communication is needed)."""
    if isinstance(param, DTensor):
        local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


def use_bf16(cfg: Config, device: torch.device) -> bool:
    return cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")


def uses_fsdp(cfg: Config, ctx: ParallelContext) -> bool:
    """FSDP2 wraps the model at dp > 1 and, for bf16, at dp = 1 too (over a 1-rank mesh): its mixed-precision
    policy (bf16 parameters in compute, fp32 master weights and optimizer state, fp32 gradient reduction) is the
    one bf16 policy of every layout, so numerics do not change with dp or across a resume at another dp."""
    return ctx.layout.dp > 1 or use_bf16(cfg, ctx.device)


def use_compile(cfg: Config, device: torch.device) -> bool:
    """``train.compile``: auto compiles the decoder blocks on GPU only (CPU compile time exceeds its gain)."""
    # auto leaves transformer-engine blocks eager: their fused kernels are what they bring
    return cfg.train.compile is True or (cfg.train.compile == "auto" and device.type == "cuda"
                                         and cfg.model.impl == "torch")


def parallelize_part(part: nn.Module, cfg: Config, ctx: ParallelContext) -> nn.Module:
    """Apply this layout to one model part (a pipeline stage or the whole model), torchtitan's order:
    tensor parallel (+ the image split of the first stage) -> activation checkpointing -> compile -> FSDP2 ->
    materialise and initialise (layout-independent values: a function of seed and parameter name)."""
    lay = ctx.layout
    if lay.tp > 1:
        apply_tensor_parallel(part, ctx.submesh("tp"), cfg.parallel.sequence_parallel)
        set_trainable(part, trainable_parts(cfg))  # TP re-registers parameters as trainable
        if cfg.parallel.vision_split == "images":
            apply_vision_split(part, ctx.submesh("tp"))
    apply_activation_checkpointing(part, cfg.parallel.activation_checkpointing)
    if use_compile(cfg, ctx.device):
        for block in part.layers.values():
            block.compile()
    if uses_fsdp(cfg, ctx):
        param_dtype = torch.bfloat16 if use_bf16(cfg, ctx.device) else None
        apply_fsdp(part, ctx.fsdp_mesh(), cfg.parallel.fsdp_reshard_after_forward, param_dtype,
                   cfg.parallel.fsdp_keep_gathered_below_mb)
    part.to_empty(device=ctx.device)
    with torch.no_grad():
        for _, p, value in initial_values(part, cfg.model, cfg.train.seed):
            copy_full_(p, value)
    if uses_fsdp(cfg, ctx):
        prepare_unsharded_params(part)
    # FP8 (TE blocks): one autocast region per block forward, scaling statistics reduced over dp
    enable_fp8(part, cfg, ctx.submesh("dp").get_group() if lay.dp > 1 else None)
    return part.train()


class ParallelModel:
    """This rank's parts of the model under the layout, and one optimizer step's forward + backward."""

    def __init__(self, cfg: Config, ctx: ParallelContext):
        self.cfg, self.ctx = cfg, ctx
        lay = ctx.layout
        whole = build_model(cfg.model, "meta")
        set_trainable(whole, trainable_parts(cfg))  # stage copies inherit requires_grad
        self.split = list(lay.split)  # derived once, by mesh.resolve_layout
        specs = stage_specs(self.split)
        self.stage_ids = lay.stages_of_rank(ctx.pp_rank)
        self.modules: list[nn.Module] = [parallelize_part(cut_stage(whole, specs[i]) if lay.pp > 1 else whole,
                                                          cfg, ctx) for i in self.stage_ids]
        self.has_first = 0 in self.stage_ids
        self.has_last = (lay.n_stages - 1) in self.stage_ids
        self.split_images = lay.tp > 1 and cfg.parallel.vision_split == "images" and self.has_first
        self.schedule = None
        self.packed = cfg.data.packing and cfg.data.document_causal
        if lay.pp > 1:
            n_mb = lay.n_microbatches
            self.schedule = build_schedule(self.modules, self.stage_ids, lay.n_stages, ctx.device,
                                           ctx.submesh("pp").get_group(), cfg.parallel.schedule, n_mb,
                                           summed_text_loss, wrap=PackedStage if self.packed else None)
        self._scoring = None  # the forward-only schedule of ``score_rows``, built on first use
        self.fsdp = uses_fsdp(cfg, ctx)
        # the head on supervised positions only: the vocab-sharded (tp) and pipelined heads see every position
        self.logits_at_labels = cfg.train.logits_at_labels and lay.tp == 1 and lay.pp == 1

    # ---- parameters

    def named_parameters(self):
        for m in self.modules:
            yield from m.named_parameters()

    def trainable_parameters(self) -> list[torch.Tensor]:
        return [p for _, p in self.named_parameters() if p.requires_grad]

    def _loss_context(self):
        return loss_parallel() if self.ctx.layout.tp > 1 else contextlib.nullcontext()

    # ---- one optimizer step's forward + backward

    def forward_backward(self, microbatches: list, num_label_tokens: int) -> float:
        """Runs this rank's microbatches (a list); ``num_label_tokens`` (supervised tokens in the whole global
        batch) is the loss normaliser. Every microbatch back-propagates its summed token loss; the gradients
        are divided by the normaliser once at the end (Megatron's per-token loss), so the schedule's loss
        function needs no per-step state. Returns the global batch's mean loss (identical on all ranks)."""
        dev = self.ctx.device
        images = _image_inputs(microbatches)  # every microbatch gets an image tensor in an image step
        total = torch.zeros((), device=dev)
        if self.schedule is None:
            model = self.modules[0]
            for i, mb in enumerate(microbatches):
                if self.fsdp:  # reduce-scatter gradients once, after the last microbatch
                    last = i == len(microbatches) - 1
                    model.set_requires_gradient_sync(last)
                    keep_gathered_between_microbatches(model, last)
                labels = mb.labels.to(dev)
                keep = labels != -100 if self.logits_at_labels else None
                with self._loss_context():
                    logits = model(mb.tokens.to(dev), _to(images[i], dev), _to(mb.positions, dev),
                                   _to(mb.doc_ids, dev), logits_at=keep)
                    loss = summed_text_loss(logits, labels if keep is None else labels[keep][None])
                    loss.backward()
                total += _plain(loss.detach())
        else:
            arg_mbs = kwarg_mbs = target_mbs = None
            if self.has_first:
                arg_mbs = [(mb.tokens.to(dev),) for mb in microbatches]
                kwarg_mbs = []
                for mb, imgs in zip(microbatches, images):
                    kw = {"images": _to(imgs, dev)} if imgs is not None else {}
                    if self.packed:  # per-document positions and masks travel with the hidden states
                        kw.update(positions=mb.positions.to(dev), doc_ids=mb.doc_ids.to(dev))
                    kwarg_mbs.append(kw)
            losses: list[torch.Tensor] = []
            if self.has_last:
                target_mbs = [mb.labels.to(dev) for mb in microbatches]
            with self._loss_context():
                run_microbatches(self.schedule, arg_mbs, kwarg_mbs, target_mbs, losses)
            for loss in losses:
                total += _plain(loss.detach())
            dist.all_reduce(total, group=self.ctx.submesh("pp").get_group())
        if self.split_images:  # each TP rank back-propagated through its own images only
            reduce_first_stage_grads(self.modules, self.ctx.submesh("tp"))
        # FSDP averaged the gradients over dp: x dp / tokens makes them the gradient of the global mean loss
        _scale_grads(self.trainable_parameters(), self.ctx.layout.dp / max(num_label_tokens, 1))
        if self.ctx.layout.dp > 1:
            dist.all_reduce(total, group=self.ctx.submesh("dp").get_group())
        total /= max(num_label_tokens, 1)
        for p in self.trainable_parameters():  # e.g. the adaptor on a text step: a zero gradient, as data
            if p.grad is None:                  # parallelism gives, so every layout keeps the same Adam state
                p.grad = torch.zeros_like(p)
        return float(total)

    # ---- forward only: evaluation

    @torch.no_grad()
    def score_rows(self, microbatches: list) -> torch.Tensor:
        """Each row's summed next-token NLL and supervised-token count, (rows, 2) fp32 on every rank of this dp
        replica, for this rank's microbatches (pipelined: exactly the training step's microbatch count and
        shapes, since pipeline shapes are fixed). Rows are not packed."""
        dev = self.ctx.device
        images = _image_inputs(microbatches)
        was_training = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()
        try:
            with self._loss_context():
                if self.schedule is None:
                    scores = torch.cat([row_scores(self.modules[0](mb.tokens.to(dev), _to(imgs, dev)),
                                                   mb.labels.to(dev)) for mb, imgs in zip(microbatches, images)])
                else:
                    scores = self._score_pipelined(microbatches, images)
        finally:
            for m, mode in zip(self.modules, was_training):
                m.train(mode)
                if self.fsdp:  # forward only: units kept gathered after forward would stay gathered
                    reshard_all(m)
        return scores

    def _score_pipelined(self, microbatches: list, images: list) -> torch.Tensor:
        dev, lay = self.ctx.device, self.ctx.layout
        if self._scoring is None:  # the training placement, forward only, the row scores as its "loss"
            self._scoring = build_schedule(self.modules, self.stage_ids, lay.n_stages, dev,
                                           self.ctx.submesh("pp").get_group(), self.cfg.parallel.schedule,
                                           len(microbatches), loss=row_scores)
        arg_mbs = kwarg_mbs = target_mbs = None
        if self.has_first:
            arg_mbs = [(mb.tokens.to(dev),) for mb in microbatches]
            kwarg_mbs = [{"images": _to(imgs, dev)} if imgs is not None else {} for imgs in images]
        if self.has_last:
            target_mbs = [mb.labels.to(dev) for mb in microbatches]
        losses: list[torch.Tensor] = []
        run_microbatches(self._scoring, arg_mbs, kwarg_mbs, target_mbs, losses, forward_only=True)
        rows = sum(mb.tokens.shape[0] for mb in microbatches)
        scores = torch.cat(losses).float() if self.has_last else torch.zeros(rows, 2, device=dev)
        dist.all_reduce(scores, group=self.ctx.submesh("pp").get_group())  # from the last stage to all
        return scores

    # ---- gradient norm over dp, tp and pp

    def clip_grad_norm_(self, max_norm: float) -> float:
        params = self.trainable_parameters()
        grads = [p.grad for p in params if p.grad is not None]
        sq = torch.zeros((), device=self.ctx.device, dtype=torch.float32)
        by_mesh: dict[object, list[torch.Tensor]] = {}
        for g in grads:
            if isinstance(g, DTensor):
                by_mesh.setdefault((g.device_mesh, tuple(g.placements)), []).append(g)
            else:  # not sharded: identical on every rank that holds it (e.g. the first stage across tp)
                sq += g.detach().float().pow(2).sum()
        for gs in by_mesh.values():
            norm = torch.nn.utils.get_total_norm(gs, 2.0, foreach=False)
            sq += _plain(norm).float().pow(2)
        if self.ctx.layout.pp > 1:  # pipeline ranks hold disjoint parameters
            dist.all_reduce(sq, group=self.ctx.submesh("pp").get_group())
        total = sq.sqrt()
        if max_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)
        return float(total)


def summed_text_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE summed over the supervised positions (labels != -100). Under tensor parallelism
    ``logits`` is vocab-sharded and this runs inside ``loss_parallel``."""
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                             reduction="sum")


def row_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, 2) fp32: each row's summed next-token NLL over supervised positions, and their count."""
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                            reduction="none")
    nll = _plain(nll).view(labels.shape).sum(1)
    return torch.stack([nll, (labels != -100).sum(1).float()], dim=1)


def text_loss(logits: torch.Tensor, labels: torch.Tensor, num_label_tokens: float) -> torch.Tensor:
    """The mean next-token CE over ``num_label_tokens`` supervised tokens (baselines and evaluation)."""
    return summed_text_loss(logits, labels) / max(num_label_tokens, 1)


def _scale_grads(params: list[torch.Tensor], factor: float) -> None:
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor)


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _image_inputs(microbatches) -> list[torch.Tensor | None]:
    """Each microbatch's images; in a step with images, a microbatch without any gets an empty (b, 0, ...)
    tensor, so the towers still run (on a blank image weighted by zero) and every rank runs the same modules."""
    present = [mb.images for mb in microbatches if mb.images is not None]
    if not present:
        return [None] * len(microbatches)
    ref = present[0]
    return [mb.images if mb.images is not None else ref.new_zeros(mb.tokens.shape[0], 0, *ref.shape[2:])
            for mb in microbatches]
