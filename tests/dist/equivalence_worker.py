"""Run under torchrun: for each layout case, compare one training step of the parallel layout with the
single-process run of the same model, data and seed. Every rank writes its measured differences to
``<out>/rank<r>.json``; the pytest wrapper (tests/test_parallel_equivalence.py) asserts on them.

Each layout runs the step twice: first with the rows placed by cost (``data.balance: rows``,
``data/placement.py``: other rows on each rank and in each microbatch), loss and gradients only, then with
the contiguous shares (loss, gradients and one AdamW step); both against the same reference.

    torchrun --nproc_per_node W tests/dist/equivalence_worker.py OUT CASES_JSON
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from vlpretrain.config import config_from_dict
from vlpretrain.data.loader import Microbatch
from vlpretrain.data.placement import place
from vlpretrain.data.step_plan import StepPlan
from vlpretrain.data.synthetic import synthetic_microbatches
from vlpretrain.models.init import canonical_name
from vlpretrain.parallel.engine import ParallelModel
from vlpretrain.train import tower_cache
from vlpretrain.parallel.mesh import ParallelContext, build_mesh, resolve_layout
from vlpretrain.parallel.pipeline_cost import row_cost
from vlpretrain.train.optim import build_optimizer

IMAGE_ID = 2


def tiny_hybrid(**over) -> dict:
    """A small hybrid DeepSeek-VL (SigLIP + SAM with the neck_hd path, GQA decoder): 16 tokens per image."""
    model = {
        "name": "tiny-test", "vocab_size": 256, "dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
        "ffn_dim": 128, "max_seq_len": 128, "image_token_id": IMAGE_ID,
        "siglip": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2},
        "sam": {"enabled": True, "image_size": 64, "patch_size": 8, "width": 32, "depth": 2, "heads": 2,
                "window_size": 3, "global_attn_indexes": [1], "neck_chans": 16, "interp_size": 16,
                "downsample_channels": [24, 32], "hd_path": True},
    }
    train = {"stage": 2, "steps": 1, "global_batch_size": 8, "micro_batch_size": 2, "seq_len": 64, "seed": 3,
             "lr": 1e-3, "eps": 1e-6, "warmup_steps": 0, "lr_schedule": "constant", "grad_clip": 0.0}
    cfg = {"model": model, "train": train, "parallel": {}}
    for key, value in over.items():
        section, name = key.split(".", 1)
        node = cfg.setdefault(section, {})
        *path, leaf = name.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def local_share(microbatches: list[Microbatch], dp_rank: int, dp: int) -> list[Microbatch]:
    k = len(microbatches) // dp
    return microbatches[dp_rank * k:(dp_rank + 1) * k]


def balanced_share(microbatches: list[Microbatch], cfg, dp_rank: int, dp: int) -> tuple[list[Microbatch], bool]:
    """This rank's microbatches under ``data.balance: rows``: the rows placed by ``placement.place`` on the
    step seen as a plan of one slot per row (its tokens, labels, images), regrouped; and whether any rank's
    rows differ from the contiguous placement."""
    rows = [(mb, r) for mb in microbatches for r in range(mb.tokens.shape[0])]
    it = cfg.model.image_tokens
    table = [[0, i, int((mb.tokens[r] != 3).sum()), int((mb.labels[r] != -100).sum()),
              int((mb.tokens[r] == IMAGE_ID).sum()) // it] for i, (mb, r) in enumerate(rows)]
    modality = "multimodal" if microbatches[0].images is not None else "text"
    plan = StepPlan(1, modality, torch.tensor(table).numpy(), [[i] for i in range(len(rows))], {})
    # these synthetic microbatches are never trimmed: place them with the full-width cost model
    at = place(plan, dp, cfg.train.micro_batch_size, dataclasses.replace(row_cost(cfg), width_multiple=0),
               pipelined=cfg.parallel.pp > 1)
    n = len(rows) // dp
    moved = at.rows != [list(range(k * n, (k + 1) * n)) for k in range(dp)]

    def cat(name: str, picked: list[int]) -> torch.Tensor | None:
        parts = [getattr(rows[i][0], name) for i in picked]
        if parts[0] is None:
            return None
        return torch.cat([t[rows[i][1]:rows[i][1] + 1] for t, i in zip(parts, picked)])
    mine, b = at.rows[dp_rank], cfg.train.micro_batch_size
    return [Microbatch(*(cat(f, mine[k:k + b]) for f in ("tokens", "labels", "images", "positions", "doc_ids")))
            for k in range(0, len(mine), b)], moved


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu()


def count_encoded_images(model: ParallelModel) -> list[int]:
    """Images this rank's vision towers see (a one-element list, updated in place)."""
    seen = [0]
    for m in model.modules:
        if m.embed is not None:
            m.embed.vision.register_forward_pre_hook(lambda mod, args: seen.__setitem__(0, seen[0] + len(args[0])))
    return seen


def _placement(x) -> str:
    """replicate, shard<dim> (also FSDP's strided shard of a TP-sharded dim), or the placement as torch says."""
    if x.is_replicate():
        return "replicate"
    return f"shard{x.dim}" if "Shard" in type(x).__name__ else str(x)


def fsdp_mesh(model: ParallelModel) -> dict | None:
    """The mesh and placements of a decoder weight (whether FSDP2 runs HSDP: a (dp_replicate, dp_shard) mesh)."""
    for name, p in model.named_parameters():
        if ".attention." in f".{name}." and isinstance(p, DTensor):
            mesh = p.device_mesh
            return {"names": list(mesh.mesh_dim_names or ()), "shape": list(mesh.shape),
                    "placements": [_placement(x) for x in p.placements]}
    return None


def run_step(model: ParallelModel, cfg, microbatches, n_labels):
    loss = model.forward_backward(microbatches, n_labels)
    grads = {canonical_name(n): full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    norm = model.clip_grad_norm_(0.0)
    params = model.trainable_parameters()
    if params:
        opt, _ = build_optimizer(params, cfg.train)
        opt.step()
    after = {canonical_name(n): full(p) for n, p in model.named_parameters()}
    return loss, grads, norm, after


def main() -> None:
    out, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    results = {}
    for case in cases:
        cfg = config_from_dict(tiny_hybrid(**case["overrides"]))
        # the reference: the same config on one process (every degree 1)
        # (``ref_overrides``: what the reference does differently, e.g. the dense-mask attention kernel)
        ref_over = {k: v for k, v in case["overrides"].items() if not k.startswith("parallel.")}
        ref_cfg = config_from_dict(tiny_hybrid(**{**ref_over, **case.get("ref_overrides", {})}))
        ref = ParallelModel(ref_cfg, ParallelContext(resolve_layout(ref_cfg, 1), device, None))
        images = case.get("images", True)  # True: up to 2 images per sample, False: none, or a number
        mbs, n_labels = synthetic_microbatches(cfg, seed=case.get("data_seed", 0),
                                               images_per_sample=2 if images is True else int(images),
                                               documents=3 if cfg.data.packing else 1)
        r_seen = count_encoded_images(ref)
        r_loss, r_grads, r_norm, r_after = run_step(ref, ref_cfg, mbs, n_labels)

        layout = resolve_layout(cfg, world)
        ctx = ParallelContext(layout, device, build_mesh(layout, device))
        par = ParallelModel(cfg, ctx)
        # train.frozen_tower_cache_mb: the balanced pass fills the cache, the measured pass below reuses it
        cache = tower_cache.install(par.modules, cfg.train.frozen_tower_cache_mb)
        placed, moved = balanced_share(mbs, cfg, ctx.dp_rank, layout.dp)
        b_loss = par.forward_backward(placed, n_labels)
        b_grads = {canonical_name(n): full(p.grad) for n, p in par.named_parameters() if p.grad is not None}
        b_norm = par.clip_grad_norm_(0.0)
        for _, p in par.named_parameters():
            p.grad = None
        p_seen = count_encoded_images(par)
        p_loss, p_grads, p_norm, p_after = run_step(par, cfg, local_share(mbs, ctx.dp_rank, layout.dp), n_labels)
        b_rel = [float((b_grads[k] - r_grads[k]).abs().max() / r_grads[k].abs().max().clamp_min(1e-12))
                 for k in b_grads]
        owned = sorted(p_after)
        grad_rel = {k: float((p_grads[k] - r_grads[k]).abs().max() / r_grads[k].abs().max().clamp_min(1e-12))
                    for k in p_grads}
        grad_abs = {k: float((p_grads[k] - r_grads[k]).abs().max()) for k in p_grads}
        param_abs = {k: float((p_after[k] - r_after[k]).abs().max()) for k in owned}
        results[case["name"]] = {
            "layout": [layout.dp, layout.tp, layout.pp, layout.vpp], "split": par.split,
            "loss": p_loss, "ref_loss": r_loss, "grad_norm": p_norm, "ref_grad_norm": r_norm,
            "owned": owned, "all_params": sorted(r_after), "grads": sorted(p_grads), "ref_grads_owned": sorted(k for k in r_grads if k in owned),
            "grad_rel_max": max(grad_rel.values(), default=0.0), "grad_abs_max": max(grad_abs.values(), default=0.0),
            "param_abs_max": max(param_abs.values(), default=0.0),
            "worst_grad": max(grad_rel, key=grad_rel.get) if grad_rel else None,
            "images_encoded": p_seen[0], "ref_images_encoded": r_seen[0], "has_first": par.has_first,
            "split_images": par.split_images, "fsdp_mesh": fsdp_mesh(par), "balanced_loss": b_loss, "balanced_grad_norm": b_norm,
            "balanced_grads": sorted(b_grads), "balanced_grad_rel_max": max(b_rel, default=0.0),
            "balanced_moved": moved, "tower_cache": cache.stats() if cache else None,
            "tower_cache_hits": cache.hits if cache else 0,
            "tower_cache_towers": sorted(cache.names.values()) if cache else [],
        }
        dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
