"""This rank's share of the model under a (dp, tp, pp, vpp) layout, and one optimizer step's forward/backward.

Order of application, as in torchtitan: cut pipeline stages (meta device) -> tensor parallel -> activation
checkpointing -> compile -> FSDP2 -> materialise and initialise. With every degree 1 this is the plain
single-process model and loop: the same code path, no collective.
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
from vlpretrain.models.vlm import build_model, set_trainable
from vlpretrain.parallel.balance import resolve_layer_split
from vlpretrain.parallel.fsdp import apply_activation_checkpointing, apply_fsdp
from vlpretrain.parallel.mesh import ParallelContext
from vlpretrain.parallel.pipeline import ScaledTextLoss, build_schedule, cut_stage, stage_specs, stages_of_rank
from vlpretrain.parallel.tensor import apply_tensor_parallel


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


class ParallelModel:
    def __init__(self, cfg: Config, ctx: ParallelContext):
        self.cfg, self.ctx = cfg, ctx
        lay = ctx.layout
        whole = build_model(cfg.model, "meta")
        set_trainable(whole, trainable_parts(cfg))  # stage copies inherit requires_grad
        self.split = resolve_layer_split(cfg) if lay.pp > 1 else [cfg.model.n_layers]
        specs = stage_specs(self.split)
        self.stage_ids = stages_of_rank(ctx.pp_rank, lay.pp, lay.vpp, cfg.parallel.schedule) if lay.pp > 1 else [0]
        self.modules: list[nn.Module] = [cut_stage(whole, specs[i]) if lay.pp > 1 else whole for i in self.stage_ids]
        param_dtype = torch.bfloat16 if use_bf16(cfg, ctx.device) else None
        for m in self.modules:
            if lay.tp > 1:
                apply_tensor_parallel(m, ctx.submesh("tp"), cfg.parallel.sequence_parallel)
                set_trainable(m, trainable_parts(cfg))  # TP re-registers parameters as trainable
            apply_activation_checkpointing(m, cfg.parallel.activation_checkpointing)
            if cfg.train.compile:
                for block in m.layers.values():
                    block.compile()
            if lay.dp > 1:
                apply_fsdp(m, ctx.submesh("dp"), cfg.parallel.fsdp_reshard_after_forward, param_dtype)
            m.to_empty(device=ctx.device)
            with torch.no_grad():
                for _, p, value in initial_values(m, cfg.model, cfg.train.seed):
                    copy_full_(p, value)
            m.train()
        # each rank's loss is its share of the global mean; FSDP averages gradients over dp, so scaling the
        # backward by dp turns that average into the sum of the shares
        self.grad_scale = lay.dp
        self.has_first = 0 in self.stage_ids
        self.has_last = (lay.n_stages - 1) in self.stage_ids
        self.schedule = None
        self.packed = cfg.data.packing and cfg.data.document_causal
        if lay.pp > 1:
            self.loss = ScaledTextLoss(text_loss)
            n_mb = cfg.train.global_batch_size // (cfg.train.micro_batch_size * lay.dp)
            self.schedule = build_schedule(self.modules, self.stage_ids, lay.n_stages, ctx.device,
                                           ctx.submesh("pp").get_group(), cfg.parallel.schedule, n_mb, self.loss,
                                           packed=self.packed)
        # bf16 autocast only when FSDP does not already cast parameters (its mixed-precision policy)
        self.autocast = (torch.autocast(ctx.device.type, dtype=torch.bfloat16)
                         if param_dtype is not None and lay.dp == 1 else contextlib.nullcontext())

    # ---- parameters

    def named_parameters(self):
        for m in self.modules:
            yield from m.named_parameters()

    def trainable_parameters(self) -> list[torch.Tensor]:
        return [p for _, p in self.named_parameters() if p.requires_grad]

    def _loss_context(self):
        return loss_parallel() if self.ctx.layout.tp > 1 else contextlib.nullcontext()

    # ---- one optimizer step's forward + backward

    def forward_backward(self, microbatches, num_label_tokens: int) -> float:
        """Runs every local microbatch; returns the global batch's mean loss (identical on all ranks)."""
        dev = self.ctx.device
        if self.schedule is None:
            model = self.modules[0]
            total = torch.zeros((), device=dev)
            for i, mb in enumerate(microbatches):
                if self.ctx.layout.dp > 1:  # reduce-scatter gradients once, after the last microbatch
                    model.set_requires_gradient_sync(i == len(microbatches) - 1)
                images, positions, doc_ids = (_to(t, dev) for t in (mb.images, mb.positions, mb.doc_ids))
                with self.autocast, self._loss_context():
                    logits = model(mb.tokens.to(dev), images, positions, doc_ids)
                    loss = text_loss(logits, mb.labels.to(dev), num_label_tokens)
                    (loss * self.grad_scale).backward()
                total += _plain(loss.detach())
        else:
            self.loss.denominator = num_label_tokens / self.grad_scale
            args, kwargs = (), {}
            if self.has_first:
                args = (torch.cat([mb.tokens for mb in microbatches]).to(dev),)
                images = _stack_images(microbatches)
                kwargs = {"images": _to(images, dev)} if images is not None else {}
                if self.packed:  # per-document positions and masks travel with the hidden states
                    kwargs["positions"] = torch.cat([mb.positions for mb in microbatches]).to(dev)
                    kwargs["doc_ids"] = torch.cat([mb.doc_ids for mb in microbatches]).to(dev)
            losses: list[torch.Tensor] = []
            if self.has_last:
                kwargs.update(target=torch.cat([mb.labels for mb in microbatches]).to(dev), losses=losses)
            with self.autocast, self._loss_context():
                self.schedule.step(*args, **kwargs)
            total = torch.zeros((), device=dev)
            for loss in losses:
                total += _plain(loss.detach()) / self.grad_scale
            if self.ctx.layout.pp > 1:
                dist.all_reduce(total, group=self.ctx.submesh("pp").get_group())
        if self.ctx.layout.dp > 1:
            dist.all_reduce(total, group=self.ctx.submesh("dp").get_group())
        for p in self.trainable_parameters():  # e.g. the adaptor on a text step: a zero gradient, as data
            if p.grad is None:                  # parallelism gives, so every layout keeps the same Adam state
                p.grad = torch.zeros_like(p)
        return float(total)

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


def text_loss(logits: torch.Tensor, labels: torch.Tensor, num_label_tokens: float) -> torch.Tensor:
    """Sum of next-token CE over supervised positions / supervised tokens in the whole GLOBAL batch, so
    accumulation over microbatches and summation over dp ranks give the global mean exactly. Under tensor
    parallelism ``logits`` is vocab-sharded and this runs inside ``loss_parallel``."""
    ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                           reduction="sum")
    return ce / max(num_label_tokens, 1)


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.to(device, non_blocking=True)
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t  # images travel as uint8


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _stack_images(microbatches) -> torch.Tensor | None:
    """Concatenate microbatch image tensors, padding the per-sample image slots to a common count."""
    present = [mb.images for mb in microbatches if mb.images is not None]
    if not present:
        return None
    m = max(x.shape[1] for x in present)
    ref = present[0]
    out = []
    for mb in microbatches:
        b = mb.tokens.shape[0]
        x = mb.images if mb.images is not None else ref.new_zeros(b, 0, *ref.shape[2:])
        if x.shape[1] < m:
            x = torch.cat([x, x.new_zeros(b, m - x.shape[1], *x.shape[2:])], dim=1)
        out.append(x)
    return torch.cat(out)
