"""Pipeline cost model: per-part time and memory of one microbatch, and the step time a split predicts.

The parts and splits are ``pipeline_split.py``'s. Cost model (per MICROBATCH of ``train.micro_batch_size``
sequences of ``train.seq_len`` tokens, on ONE device):

* FLOPs: forward FLOPs from ``vlpretrain.models.flops`` (siglip/sam/adaptor per image, decoder layer and head
  per sequence); forward+backward from ``step_flops`` (the same backward rules as the MFU counter: frozen parts
  upstream of every trainable parameter run no backward, trainable parts pay weight grads, activation grads
  flow through everything downstream of the first trainable part), so the per-part sums equal ``step_flops``.
  With ``parallel.tp`` > 1 decoder layers and head are divided by tp; ``embed``'s vision side is divided by
  the image split (``parallel.vision_split: images``: the busiest TP rank encodes ceil(images / tp) of a
  microbatch, at least the blank one a rank without images runs; the all-gather of the adaptor outputs is
  small next to the towers and not modelled); with ``replicate`` (the paper) every TP rank encodes every
  image. ``activation_checkpointing: full`` adds one forward of every decoder layer that runs a backward.
* Time: flops / (peak TFLOP/s x 1e12 x ``EFFICIENCY``). Peak: ``logging.peak_tflops`` if set, else the visible
  GPU's datasheet peak (``hardware.device_peak_tflops``), else (no GPU: planning on a CPU host) the H100
  figure, since the plan is for GPU training and only ratios decide the split. ``EFFICIENCY`` = 0.4 for every
  part: a flat MFU guess; measured times (``measure_part_times`` / ``plan --measure``) replace the model when
  the encoders run at a different efficiency than the decoder.
* Memory (bytes per device): weights in the compute dtype (bf16 unless ``train.dtype: fp32``) for every
  parameter, plus for trainable parameters an fp32 master copy (bf16 only), an fp32 gradient and AdamW's two
  fp32 states; no ZeRO/FSDP sharding over dp is assumed. Activations per in-flight microbatch: decoder layer
  s*b*h*34 bytes (Megatron's sbh(34 + 5as/h) without the 5as/h score term: ``F.scaled_dot_product_attention``
  runs fused flash/memory-efficient kernels that store no S x S scores; with tp: sbh(10 + 24/tp) or, with
  sequence parallel, 34sbh/tp; ``selective`` recomputation keeps the same estimate; ``full`` keeps only the
  bf16 layer input, 2sbh); head: bf16 input + fp32 log-softmax of the logits, b*s*(4h + 4V/tp); a trainable
  vision tower: 34 bytes x tokens x width x depth per image; the adaptor (when it runs a backward): the inputs
  and outputs of its Linear layers in bf16. Parts that run no backward keep no activations.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from vlpretrain.config import Config, ModelConfig, trainable_parts
from vlpretrain.data.placement import RowCost, width_multiple
from vlpretrain.layout_rules import placement_rank, schedule_info
from vlpretrain.models.flops import adaptor_flops, decoder_layer_flops, head_flops, sam_flops, siglip_flops, step_flops
from vlpretrain.parallel.pipeline_split import part_names, stage_bounds, stage_style, validate_split

EFFICIENCY = 0.4  # fraction of peak FLOP/s the time model assumes for every part (MFU guess)
NO_GPU_PEAK_TFLOPS = 989.0  # H100 dense bf16: the assumed target when planning on a host without a GPU
LAYER_ACT_BYTES = 34  # Megatron: bytes per (token x hidden) of one transformer layer in 16-bit, no TP
VIT_ACT_BYTES = 34  # same estimate for a trainable ViT block (per token x width)


# ---------------------------------------------------------------------------------------------------------------
# Cost model


@dataclass
class PartCost:
    name: str
    time_s: float  # forward + backward (+ recompute) seconds per microbatch
    memory_bytes: float  # static_bytes + activation_bytes (one microbatch in flight)
    flops: float  # forward + backward (+ recompute) FLOPs per microbatch on one device
    forward_flops: float = 0.0
    static_bytes: float = 0.0  # weights, master weights, grads, optimizer states
    activation_bytes: float = 0.0  # per in-flight microbatch
    params: int = 0
    trainable_params: int = 0
    measured: bool = False


_PARAM_CACHE: dict[str, tuple[dict[str, dict[str, int]], int]] = {}


def _part_params(m: ModelConfig) -> tuple[dict[str, dict[str, int]], int]:
    """(counts per pipeline part and paper part, sum of in+out features of the adaptor's Linears), from the
    model built on the meta device; cached per model config."""
    key = json.dumps(dataclasses.asdict(m), sort_keys=True)
    if key not in _PARAM_CACHE:
        from torch import nn

        from vlpretrain.models.vlm import build_model, part_of

        model = build_model(m, "meta")
        counts: dict[str, dict[str, int]] = {}
        for name, p in model.named_parameters():
            if name.startswith("embed."):
                part = "embed"
            elif name.startswith("layers."):
                part = "layers." + name.split(".")[1]
            elif name.startswith("head."):
                part = "head"
            else:  # pragma: no cover - a parameter outside the three part kinds
                raise ValueError(f"parameter {name} belongs to no pipeline part")
            group = counts.setdefault(part, {})
            group[part_of(name)] = group.get(part_of(name), 0) + p.numel()
        widths = sum(mod.in_features + mod.out_features for mod in model.embed.adaptor.modules()
                     if isinstance(mod, nn.Linear))
        if len(_PARAM_CACHE) > 8:
            _PARAM_CACHE.clear()
        _PARAM_CACHE[key] = (counts, widths)
    return _PARAM_CACHE[key]


def part_parameters(m: ModelConfig) -> dict[str, dict[str, int]]:
    """Parameter counts per pipeline part and paper part (siglip/sam/adaptor/llm), from the meta-device model."""
    return {k: dict(v) for k, v in _part_params(m)[0].items()}


def peak_tflops(cfg: Config) -> float:
    """The peak the time model scales: logging.peak_tflops, else the visible GPU's, else H100 (see module doc)."""
    if cfg.logging.peak_tflops > 0:
        return cfg.logging.peak_tflops
    import torch

    if torch.cuda.is_available():
        from vlpretrain.hardware import device_peak_tflops

        return device_peak_tflops(cfg, torch.device("cuda"))
    return NO_GPU_PEAK_TFLOPS


def encoded_images(cfg: Config, images: float) -> float:
    """Images the busiest first-stage TP rank encodes for a microbatch holding ``images`` (module docstring):
    all of them (``vision_split: replicate`` or tp 1), else ceil(images / tp) and at least the blank image a
    rank without one runs; a fractional count (an average) is divided evenly."""
    tp = cfg.parallel.tp
    if images <= 0 or tp == 1 or cfg.parallel.vision_split != "images":
        return float(max(images, 0.0))
    if float(images).is_integer():
        return float(max(1, math.ceil(images / tp)))
    return max(1.0, images / tp)


def _check_measured(measured: dict[str, float], names: list[str]) -> None:
    missing = [n for n in names if n not in measured]
    unknown = sorted(set(measured) - set(names))
    if missing or unknown:
        raise ValueError(f"measured times: missing parts {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unknown {unknown[:3]}")


def _decoder_activation_bytes(cfg: Config) -> tuple[float, float]:
    """Bytes one microbatch keeps for backward in a decoder layer and in the head (see the module docstring)."""
    m, par = cfg.model, cfg.parallel
    b, s, tp = cfg.train.micro_batch_size, cfg.train.seq_len, par.tp
    sbh = b * s * m.dim
    if par.activation_checkpointing == "full":
        layer = 2.0 * sbh / (tp if par.sequence_parallel else 1)
    elif tp == 1 or par.sequence_parallel:
        layer = LAYER_ACT_BYTES * sbh / tp
    else:
        layer = sbh * (10 + 24 / tp)
    return layer, b * s * (4 * m.dim + 4 * m.vocab_size / tp)


def _embed_activation_bytes(m: ModelConfig, trainable: set[str] | list[str], adaptor_widths: int) -> float:
    """Bytes per image the first stage keeps for backward: trainable towers and the adaptor's Linear layers."""
    per_image = 0.0
    if "siglip" in trainable:
        g = m.siglip.image_size // m.siglip.patch_size
        per_image += VIT_ACT_BYTES * g * g * m.siglip.width * m.siglip.depth
    if "sam" in trainable and m.sam.enabled:
        g = m.sam.image_size // m.sam.patch_size
        per_image += VIT_ACT_BYTES * g * g * m.sam.width * m.sam.depth
    return per_image + 2 * m.image_tokens * adaptor_widths


def part_costs(cfg: Config, device_tflops: float | None = None, measured: dict[str, float] | None = None,
               images_per_sample: float = 1.0, efficiency: float = EFFICIENCY,
               image_counts: tuple[float, ...] | None = None) -> list[PartCost]:
    """Per-microbatch time, memory and FLOPs of each part, in order [embed, layers.0, ..., head].

    ``device_tflops``: peak TFLOP/s (default ``peak_tflops(cfg)``); time = flops / (peak x 1e12 x efficiency).
    ``measured``: part name -> measured forward+backward seconds; replaces the time model (all parts needed).
    Images: ``image_counts`` (images per microbatch, one entry per microbatch observed: a step type's) or
    ``images_per_sample`` x micro batch; ``encoded_images`` gives what the busiest TP rank encodes of them.
    Per-part FLOPs are one device's (tp and the image split applied).
    """
    m, t, par = cfg.model, cfg.train, cfg.parallel
    if images_per_sample < 0 or (image_counts is not None and any(n < 0 for n in image_counts)):
        raise ValueError(f"images per sample / microbatch must be >= 0, got {images_per_sample}, {image_counts}")
    trainable = trainable_parts(cfg)
    b, s, tp = t.micro_batch_size, t.seq_len, par.tp
    names = part_names(m.n_layers)
    if measured is not None:
        _check_measured(measured, names)
    peak = device_tflops if device_tflops is not None else peak_tflops(cfg)
    rate = peak * 1e12 * efficiency

    # FLOPs: forward from the per-part formulas, forward+backward via step_flops' backward rules
    if image_counts is not None:
        images = sum(encoded_images(cfg, n) for n in image_counts) / max(len(image_counts), 1)
    else:
        images = encoded_images(cfg, b * images_per_sample)
    emb_fwd = images * (siglip_flops(m) + sam_flops(m) + adaptor_flops(m))
    emb_step = step_flops(m, 0, s, images, trainable)  # sequences=0: the vision side + adaptor only
    emb_tot = emb_fwd * emb_step.total / emb_step.forward if emb_step.forward > 0 else 0.0
    llm = step_flops(m, b, s, 0, trainable)  # images=0: decoder + head only
    llm_ratio = llm.total / llm.forward  # 1, 2 or 3
    layer_fwd = b * decoder_layer_flops(m, s) / tp
    head_fwd = b * head_flops(m, s) / tp
    recompute = layer_fwd if (par.activation_checkpointing == "full" and llm_ratio > 1) else 0.0

    # memory
    bf16 = t.dtype != "fp32"
    w_bytes = 2 if bf16 else 4
    train_bytes = w_bytes + (4 if bf16 else 0) + 4 + 8  # (+master) + grad + AdamW m, v
    params, adaptor_widths = _part_params(m)

    def static(name: str, shard: int) -> tuple[float, int, int]:
        grp = params.get(name, {})
        total = sum(grp.values())
        tr = sum(n for part, n in grp.items() if part in trainable)
        return ((total - tr) * w_bytes + tr * train_bytes) / shard, total, tr

    layer_act, head_act = _decoder_activation_bytes(cfg) if llm_ratio > 1 else (0.0, 0.0)
    # something in embed runs a backward: it keeps activations
    emb_act = images * _embed_activation_bytes(m, trainable, adaptor_widths) if emb_tot > emb_fwd else 0.0

    out: list[PartCost] = []
    for name in names:
        if name == "embed":
            fwd, tot, act = emb_fwd, emb_tot, emb_act
            st, n, tr = static(name, 1)  # weights not tensor-parallel: replicated on every TP rank
        elif name == "head":
            fwd, tot, act = head_fwd, head_fwd * llm_ratio, head_act
            st, n, tr = static(name, tp)
        else:
            fwd, tot, act = layer_fwd, layer_fwd * llm_ratio + recompute, layer_act
            st, n, tr = static(name, tp)
        time_s = measured[name] if measured is not None else tot / rate
        out.append(PartCost(name=name, time_s=time_s, memory_bytes=st + act, flops=tot, forward_flops=fwd,
                            static_bytes=st, activation_bytes=act, params=n, trainable_params=tr,
                            measured=measured is not None))
    return out


def row_cost(cfg: Config) -> RowCost:
    """The weights ``data.balance: rows`` places rows by (``data/placement.py``), in forward+backward FLOPs of
    one device, with the backward rules of ``part_costs``: per image the busiest first-stage TP rank encodes,
    per token slot of a row (decoder layers, and the head unless it runs on supervised tokens only:
    ``train.logits_at_labels``, then per supervised token; divided by tp), per squared document length (the
    attention scores of the decoder layers, per packed document when document-causal)."""
    m, par = cfg.model, cfg.parallel
    trainable = trainable_parts(cfg)
    emb = step_flops(m, 0, 1, 1, trainable)  # sequences=0: one image through the towers and the adaptor
    fwd = siglip_flops(m) + sam_flops(m) + adaptor_flops(m)
    image = fwd * emb.total / emb.forward if emb.forward > 0 else 0.0
    llm = step_flops(m, 1, 1, 0, trainable)
    ratio = llm.total / llm.forward
    # a layer costs s x a + s^2 x q for a sequence of s tokens (flops.decoder_layer_flops)
    f1, f2 = decoder_layer_flops(m, 1), decoder_layer_flops(m, 2)
    q = (f2 - 2 * f1) / 2
    layer_ratio = ratio + (1 if par.activation_checkpointing == "full" and ratio > 1 else 0)
    head = head_flops(m, 1) * ratio / par.tp
    at_labels = cfg.train.logits_at_labels and par.tp == 1 and par.pp == 1  # the engine's rule
    position = m.n_layers * (f1 - q) * layer_ratio / par.tp + (0.0 if at_labels else head)
    split = par.vision_split == "images" and par.tp > 1
    return RowCost(image=image, position=position, attention=m.n_layers * q * layer_ratio / par.tp,
                   seq_len=cfg.train.seq_len, per_document=cfg.data.packing and cfg.data.document_causal,
                   tp=par.tp if split else 1, width_multiple=width_multiple(cfg), label=head if at_labels else 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Prediction


def inflight_microbatches(schedule: str, pp: int, vpp: int, r: int, n_mb: int) -> float:
    """Microbatches whose activations pipeline rank ``r`` holds at its peak (``predict``'s docstring)."""
    if schedule == "gpipe":
        return float(n_mb)
    if schedule == "dualpipev":
        return float(min(pp + 1, n_mb))
    if vpp > 1:  # interleaved 1F1B (also 1f1b / zero_bubble configured with vpp > 1)
        return min(2 * (pp - r - 1) + (vpp - 1) * pp + 1, n_mb * vpp) / vpp
    return float(min(pp - r, n_mb))


def step_time(vtime: list[float], pp: int, placement: str, n_mb: int, bubble: float) -> float:
    """``predict``'s step time from the virtual stages' times: n_mb x the slowest rank + bubble x (pp - 1) x the
    slowest virtual stage."""
    rtime = [0.0] * pp
    for k, t in enumerate(vtime):
        rtime[placement_rank(k, pp, placement)] += t
    return n_mb * max(rtime) + bubble * (pp - 1) * max(vtime)


def predict(cfg: Config, split: list[int], costs: list[PartCost], n_microbatches: int, dp: int = 1) -> dict:
    """Per-rank time and memory and the step time of ``split`` under ``parallel.schedule``, for one step type
    (``costs``) and ``n_microbatches`` per pipeline (``mesh.Layout.n_microbatches``; ``dp`` is reported).

    ``stage_time[r]``: forward+backward seconds of one microbatch on rank r (sum of its virtual stages).
    ``stage_memory[r]``: static bytes + activations of the microbatches in flight at the peak:
      gpipe: all n_mb; 1f1b / zero_bubble (vpp = 1): min(pp - r, n_mb); interleaved (vpp > 1):
      min(2(pp - r - 1) + (vpp - 1)pp + 1, n_mb vpp) chunks of the rank's mean chunk (Megatron's warm-up count
      + 1); dualpipev: min(pp + 1, n_mb) microbatches of the rank (DeepSeek-V3, Table 2).
    ``step_time`` = n_mb x max_r stage_time[r] + f x (pp - 1) x (slowest virtual stage), f = the schedule
      table's ``bubble``: 1, and 1/3 for zero_bubble (ZB-H1: B and W each ~1/3 of a fwd+bwd). With vpp = 1 that
      is (n_mb + pp - 1) x max rank time; with balanced chunks under interleaving it is Megatron's
      (n_mb + (pp - 1)/vpp) x max rank time. Communication, optimizer step and data loading are not modelled.
    """
    par = cfg.parallel
    pp, vpp = par.pp, par.vpp
    v = pp * vpp
    validate_split(list(split), cfg.model.n_layers, v)
    if len(costs) != cfg.model.n_layers + 2:
        raise ValueError(f"costs has {len(costs)} parts, the model has {cfg.model.n_layers + 2}")
    style = stage_style(par.schedule)
    n_mb = n_microbatches
    bounds = stage_bounds(list(split))
    vtime = [sum(c.time_s for c in costs[a:e]) for a, e in bounds]
    vact = [sum(c.activation_bytes for c in costs[a:e]) for a, e in bounds]
    vstatic = [sum(c.static_bytes for c in costs[a:e]) for a, e in bounds]
    rtime, ract, rstatic = [0.0] * pp, [0.0] * pp, [0.0] * pp
    rlayers: list[list[int]] = [[] for _ in range(pp)]
    for k in range(v):
        r = placement_rank(k, pp, style)
        rtime[r] += vtime[k]
        ract[r] += vact[k]
        rstatic[r] += vstatic[k]
        rlayers[r].append(split[k])
    sched = par.schedule
    mem = [rstatic[r] + inflight_microbatches(sched, pp, vpp, r, n_mb) * ract[r] for r in range(pp)]
    bubble = (pp - 1) * max(vtime) * schedule_info(sched).bubble
    return {
        "split": list(split), "stage_time": rtime, "stage_memory": mem, "step_time": n_mb * max(rtime) + bubble,
        "virtual_stage_time": vtime, "rank_layers": rlayers, "n_microbatches": n_mb, "dp": dp,
        "bubble_s": bubble, "schedule": sched,
    }
