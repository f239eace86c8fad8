"""``vlpretrain plan``: the uniform and the vision-aware split side by side, from the cost model of
``balance.py`` or from per-part times measured on this machine (``--measure``)."""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlpretrain.config import Config, ConfigError, trainable_parts
from vlpretrain.data.synthetic import synthetic_microbatches
from vlpretrain.models.vlm import build_model, set_trainable
from vlpretrain.parallel.balance import (EFFICIENCY, PartCost, _part_params, part_costs, part_names, partition_details, peak_tflops,
                                         predict, stage_style, uniform_split)


# ---------------------------------------------------------------------------------------------------------------
# Measurement


def measure_part_times(cfg: Config, steps: int = 3, device: str = "cpu", images_per_sample: int = 1,
                       seed: int = 0, max_cpu_params: int = 500_000_000) -> dict[str, float]:
    """Measured forward+backward seconds per part for one synthetic microbatch, median of ``steps`` after one
    warm-up. Parts run one at a time: each part's input is the previous output detached (requiring grad when
    the previous output did), the loss is part of ``head``; backward runs part by part from the end with the
    grad of the next part's input, so every part is timed alone. Frozen parts follow ``trainable_parts`` (a part
    whose output needs no grad runs no backward). ``full`` activation checkpointing wraps decoder layers in
    ``torch.utils.checkpoint``. Real model weights are built: on CPU, models over ``max_cpu_params`` parameters
    are refused (ValueError). Measured times are used as they are (no division by tp)."""
    dev = torch.device(device)
    n_params = sum(sum(g.values()) for g in _part_params(cfg.model)[0].values())
    if dev.type == "cpu" and n_params > max_cpu_params:
        raise ValueError(f"measuring {cfg.model.name} ({n_params / 1e9:.1f}B parameters) on CPU would build the full "
                         f"model in memory: measure on a GPU, or a smaller config (e.g. --set model.n_layers=2)")
    model = build_model(cfg.model, dev, seed=seed)
    set_trainable(model, trainable_parts(cfg))
    model.train()
    (mb,), _ = synthetic_microbatches(cfg, seed, images_per_sample, num_samples=cfg.train.micro_batch_size)
    tokens, labels = mb.tokens.to(dev), mb.labels.to(dev)
    images = mb.images.to(dev) if mb.images is not None else None
    use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and dev.type == "cuda")
    ckpt = cfg.parallel.activation_checkpointing == "full"
    names = part_names(cfg.model.n_layers)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run_part(name: str, x):
        if name == "embed":
            return model.embed(tokens, images)
        if name == "head":
            logits = model.head(x)
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        layer = model.layers[name.split(".", 1)[1]]
        if ckpt and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(layer, x, use_reentrant=False)
        return layer(x)

    samples: dict[str, list[float]] = {n: [] for n in names}
    for it in range(steps + 1):
        model.zero_grad(set_to_none=True)
        inputs, outputs, fwd = [], [], []
        x = None
        for name in names:
            if x is not None:
                x = x.detach().requires_grad_(x.requires_grad)
            inputs.append(x)
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                y = run_part(name, x)
            sync()
            fwd.append(time.perf_counter() - t0)
            outputs.append(y)
            x = y
        bwd = [0.0] * len(names)
        grad = None
        for i in range(len(names) - 1, -1, -1):
            y = outputs[i]
            if y.requires_grad:
                sync()
                t0 = time.perf_counter()
                torch.autograd.backward(y, grad)
                sync()
                bwd[i] = time.perf_counter() - t0
            inp = inputs[i]
            grad = inp.grad if inp is not None else None
            if inp is not None and grad is None and inp.requires_grad:
                grad = torch.zeros_like(inp)
        if it > 0:
            for i, name in enumerate(names):
                samples[name].append(fwd[i] + bwd[i])
    model.zero_grad(set_to_none=True)
    return {n: statistics.median(v) for n, v in samples.items()}


# ---------------------------------------------------------------------------------------------------------------
# The ``vlpretrain plan`` report


def plan(cfg: Config, measured: dict[str, float] | None = None, world_size: int | None = None,
         images_per_sample: float = 1.0) -> dict:
    """Predictions for the uniform split and the balanced one, plus the costs they come from. ``uniform`` is
    None where the even spread leaves a middle stage empty (more virtual stages than layers allow)."""
    costs = part_costs(cfg, measured=measured, images_per_sample=images_per_sample)
    par = cfg.parallel
    v = par.pp * par.vpp
    uni = uniform_split(cfg.model.n_layers, v)
    try:
        uniform = predict(cfg, uni, costs, world_size)
        uniform_error = ""
    except ConfigError as e:
        uniform, uniform_error = None, str(e)
    det = partition_details([c.time_s for c in costs], v, par.pp, stage_style(par.schedule))
    return {"uniform": uniform, "auto": predict(cfg, det["split"], costs, world_size), "auto_exact": det["exact"],
            "uniform_error": uniform_error, "costs": costs}


def _gib(x: float) -> str:
    return f"{x / 2 ** 30:.1f} GiB" if x >= 2 ** 30 else f"{x / 2 ** 20:.1f} MiB"


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f} ms" if x < 10 else f"{x:.1f} s"


def format_plan(cfg: Config, result: dict, images_per_sample: float = 1.0) -> str:
    par, t = cfg.parallel, cfg.train
    u, a = result["uniform"], result["auto"]
    costs: list[PartCost] = result["costs"]
    lines = [f"{cfg.model.name} stage {t.stage}: pp={par.pp} vpp={par.vpp} tp={par.tp} schedule={par.schedule} "
             f"dp={a['dp']}: {a['n_microbatches']} microbatches of {t.micro_batch_size}x{t.seq_len} tokens, "
             f"{images_per_sample:g} image(s)/sample, trainable {'+'.join(trainable_parts(cfg))}"]
    if costs and costs[0].measured:
        lines.append("times: measured on this machine (plan --measure)")
    else:
        lines.append(f"times: model FLOPs / ({peak_tflops(cfg):g} TFLOP/s peak x {EFFICIENCY:g} efficiency)")
    layer = costs[1] if len(costs) > 2 else None
    rel = ""
    if layer is not None and layer.time_s > 0:
        rel = (f"  (embed = {costs[0].time_s / layer.time_s:.2f} layers, "
               f"head = {costs[-1].time_s / layer.time_s:.2f} layers)")
    lines.append("per microbatch fwd+bwd: embed " + _ms(costs[0].time_s)
                 + (f", decoder layer {_ms(layer.time_s)}" if layer else "") + f", head {_ms(costs[-1].time_s)}" + rel)
    note = "" if result.get("auto_exact", True) else "  (search budget hit: best found, not proven optimal)"
    lines.append(f"split uniform {u['split'] if u else 'invalid'}   auto {a['split']}{note}")
    if u is None:
        lines.append(f"uniform: {result.get('uniform_error', '')}")
    lines.append("")
    lines.append(f"{'rank':<6}{'uniform: layers':>16}{'time/mb':>12}{'memory':>12}   "
                 f"{'auto: layers':>13}{'time/mb':>12}{'memory':>12}")
    for r in range(par.pp):
        la = "+".join(str(x) for x in a["rank_layers"][r])
        if u is not None:
            lu = "+".join(str(x) for x in u["rank_layers"][r])
            left = f"{lu:>16}{_ms(u['stage_time'][r]):>12}{_gib(u['stage_memory'][r]):>12}"
        else:
            left = f"{'-':>16}{'':>24}"
        lines.append(f"{r:<6}{left}   {la:>13}{_ms(a['stage_time'][r]):>12}{_gib(a['stage_memory'][r]):>12}")
    lines.append(f"{'step':<6}{'':>16}{(_ms(u['step_time']) if u else '-'):>12}{'':>12}   "
                 f"{'':>13}{_ms(a['step_time']):>12}")
    if u is not None and u["step_time"] > 0 and a["step_time"] > 0:
        ratio = a["step_time"] / u["step_time"]
        lines.append(f"auto / uniform step time = {ratio:.3f}  ({(1 / ratio - 1) * 100:+.1f}% throughput)")
    return "\n".join(lines)
