"""Helpers of ``bench/gpu_check.py``: the step batches, the engine's loop and the plain PyTorch baseline's loop.

Both loops run the same ``Step`` list (packed rows, modality-grouped: all-text or all-multimodal steps) and
fill a result dict as they go, so a check stopped by its time budget still reports the steps it measured.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlpretrain.config import Config, trainable_parts
from vlpretrain.data.synthetic import synthetic_microbatches
from vlpretrain.models.flops import step_flops

GIB = 2 ** 30


@dataclass
class Step:
    kind: str  # "text" or "multimodal"
    microbatches: list
    num_label_tokens: int
    rows: int
    images: int  # images encoded in the whole step (for its FLOPs)


def step_kinds(n: int, language_share: float) -> list[str]:
    """Modality-grouped steps as the sampler gives them: round(n x (1 - share)) multimodal steps spread evenly
    among the text ones."""
    mm = min(n, max(0, round(n * (1 - language_share))))
    kinds = ["text"] * n
    for j in range(mm):
        kinds[int((j + 0.5) * n / mm)] = "multimodal"
    return kinds


def make_steps(cfg: Config, kinds: list[str], max_images: int, documents: int, seed: int,
               pin: bool) -> list[Step]:
    """One global batch per kind: packed rows of ``documents`` documents; a multimodal row carries 0..max_images
    images (uint8, as the data path delivers them)."""
    m = cfg.model
    out = []
    for i, kind in enumerate(kinds):
        mm = kind == "multimodal"
        mbs, n = synthetic_microbatches(cfg, seed=seed + i, images_per_sample=max_images if mm else 0,
                                        documents=documents)
        images = 0
        for mb in mbs:
            if mb.images is not None:
                mb.images = (mb.images * 255).round().to(torch.uint8)
            images += int((mb.tokens == m.image_token_id).sum()) // m.image_tokens
            if pin:
                for name in ("tokens", "labels", "images", "positions", "doc_ids"):
                    t = getattr(mb, name)
                    if t is not None:
                        setattr(mb, name, t.pin_memory())
        out.append(Step(kind, mbs, n, sum(mb.tokens.shape[0] for mb in mbs), images))
    return out


def step_model_flops(cfg: Config, step: Step) -> tuple[float, float]:
    """The step's model FLOPs as ``models/flops.py`` counts them (attention scores as a full S x S, Megatron's
    convention), and the same with the decoder's attention halved (causal), for a second, stricter MFU."""
    trainable = trainable_parts(cfg)
    total = step_flops(cfg.model, step.rows, cfg.train.seq_len, step.images, trainable).total
    m, s = cfg.model, cfg.train.seq_len
    passes = 3 if "llm" in trainable else 2  # step_flops' multiplier of the decoder: fwd + bwd (+ weight grads)
    attn = step.rows * m.n_layers * 4 * s * s * m.n_heads * m.head_dim * passes
    return total, total - attn / 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(step_fn: Callable[[Step], float], warm: list[Step], steps: list[Step], cfg: Config,
            device: torch.device, peak_tflops: float, deadline: float, out: dict) -> dict:
    """Warm-up steps (compilation, allocator), then timed steps until ``deadline`` (at least one). ``out`` is
    updated after every step: tokens/s and MFU over the timed steps, per step kind too, and peak memory."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for s in warm:
        out["loss_warmup_last"] = round(float(step_fn(s)), 4)
    sync(device)
    out["warmup_s"] = round(time.perf_counter() - t0, 2)
    graphs0 = _compiled_graphs()
    seq = cfg.train.seq_len
    tot = {"time": 0.0, "tokens": 0, "flops": 0.0, "flops_causal": 0.0, "steps": 0}
    by_kind: dict[str, dict] = {}
    for s in steps:
        if tot["steps"] and time.perf_counter() > deadline:
            out["stopped_early"] = f"time budget: {tot['steps']} of {len(steps)} timed steps"
            break
        sync(device)
        t = time.perf_counter()
        loss = step_fn(s)
        sync(device)
        dt = time.perf_counter() - t
        flops, flops_causal = step_model_flops(cfg, s)
        for acc in (tot, by_kind.setdefault(s.kind, dict.fromkeys(tot, 0))):
            acc["time"] += dt
            acc["tokens"] += s.rows * seq
            acc["flops"] += flops
            acc["flops_causal"] += flops_causal
            acc["steps"] += 1
        out["loss_last"] = round(float(loss), 4)
        out.update(_rates(tot, peak_tflops))
        out["by_kind"] = {k: _rates(v, peak_tflops) for k, v in by_kind.items()}
        if cuda:
            out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
            out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GIB, 3)
    if graphs0 is not None and _compiled_graphs() != graphs0:  # a recompile inside the timed steps
        out["graphs_compiled_in_timed_steps"] = _compiled_graphs() - graphs0
    if cuda:  # weights + optimizer state (+ whatever the step keeps), after zero_grad
        out["allocated_after_step_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 3)
    return out


def _compiled_graphs() -> int | None:
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None


def _rates(acc: dict, peak_tflops: float) -> dict:
    t = max(acc["time"], 1e-9)
    return {"timed_steps": acc["steps"], "step_s": round(t / acc["steps"], 4),
            "tokens_per_s": round(acc["tokens"] / t, 1), "mfu": round(acc["flops"] / t / 1e12 / peak_tflops, 4),
            "mfu_causal_attention": round(acc["flops_causal"] / t / 1e12 / peak_tflops, 4)}


# ---------------------------------------------------------------------------------------------------------------
# The framework's engine, every degree 1


def run_engine(cfg: Config, device: torch.device, warm: list[Step], steps: list[Step], peak_tflops: float,
               deadline: float, out: dict) -> dict:
    """The trainer's step: ``ParallelModel.forward_backward``, its gradient clipping, the trainer's AdamW."""
    from vlpretrain.parallel.engine import ParallelModel, use_compile
    from vlpretrain.parallel.mesh import init_parallel
    from vlpretrain.train.optim import build_optimizer

    out["compile"] = bool(use_compile(cfg, device))
    engine = ParallelModel(cfg, init_parallel(cfg, device))
    opt, _ = build_optimizer(engine.trainable_parameters(), cfg.train)

    def step(s: Step) -> float:
        loss = engine.forward_backward(s.microbatches, s.num_label_tokens)
        engine.clip_grad_norm_(cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    try:
        return measure(step, warm, steps, cfg, device, peak_tflops, deadline, out)
    finally:
        engine = opt = step = None  # drop the references before freeing the memory
        free_memory(device)


# ---------------------------------------------------------------------------------------------------------------
# The plain PyTorch baseline: timm SigLIP (frozen) -> MLP adaptor -> HF LlamaForCausalLM (sdpa)


class PlainVLM(nn.Module):
    """What a user would write with off-the-shelf parts, at the config's sizes. The frozen SigLIP runs under
    ``no_grad`` (our engine gets the same from parameters without grad: no activations kept, no backward)."""

    def __init__(self, cfg: Config):
        super().__init__()
        import timm
        import transformers

        m = cfg.model
        s = m.siglip
        self.image_token_id, self.image_tokens = m.image_token_id, m.image_tokens
        self.siglip = timm.create_model(
            "vit_large_patch16_siglip_384", pretrained=False, num_classes=0, global_pool="",
            img_size=s.image_size, patch_size=s.patch_size, embed_dim=s.width, depth=s.depth, num_heads=s.heads,
            mlp_ratio=s.mlp_ratio)
        self.siglip.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(s.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(s.std).view(1, 3, 1, 1), persistent=False)
        self.adaptor = nn.Sequential(nn.Linear(s.width, m.dim), nn.GELU(), nn.Linear(m.dim, m.dim))
        hf_cfg = transformers.LlamaConfig(
            vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_dim, num_hidden_layers=m.n_layers,
            num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads, rms_norm_eps=m.norm_eps,
            rope_theta=m.rope_theta, max_position_embeddings=max(m.max_seq_len, cfg.train.seq_len),
            tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")
        self.llm = transformers.LlamaForCausalLM(hf_cfg)

    def forward(self, tokens, images, positions):
        is_image = tokens == self.image_token_id
        h = self.llm.get_input_embeddings()(tokens.masked_fill(is_image, 0))
        if images is not None and bool(is_image.any()):
            n = is_image.sum(1) // self.image_tokens
            slots = torch.arange(images.shape[1], device=tokens.device)[None, :] < n[:, None]
            px = images[slots]
            px = px.float().div_(255.0) if px.dtype == torch.uint8 else px
            with torch.no_grad():
                feats = self.siglip.forward_features((px - self.mean) / self.std)
            feats = self.adaptor(feats).to(h.dtype)
            h = h.masked_scatter(is_image.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
        # packed rows: position_ids restarting per document make transformers build the document-causal mask
        return self.llm(inputs_embeds=h, position_ids=positions, use_cache=False).logits


def run_baseline(cfg: Config, device: torch.device, bf16: bool, warm: list[Step], steps: list[Step],
                 peak_tflops: float, deadline: float, out: dict) -> dict:
    """bf16 autocast over fp32 weights, fused AdamW (foreach on CPU), the same clipping and loss scaling."""
    with torch.device(device):
        model = PlainVLM(cfg).float().train()
    out["attn_implementation"] = getattr(model.llm.config, "_attn_implementation", None)
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay,
                            **kernel)

    def step(s: Step) -> float:
        total = torch.zeros((), device=device)
        for mb in s.microbatches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(mb.tokens.to(device), _to(mb.images, device), _to(mb.positions, device))
            loss = F.cross_entropy(logits.float().flatten(0, 1), mb.labels.to(device).flatten(), ignore_index=-100,
                                   reduction="sum") / max(s.num_label_tokens, 1)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(total)

    try:
        return measure(step, warm, steps, cfg, device, peak_tflops, deadline, out)
    finally:
        model = opt = params = step = None  # drop the references before freeing the memory
        free_memory(device)


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)
