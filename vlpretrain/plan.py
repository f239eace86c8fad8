"""``vlpretrain plan``: the uniform split, the multimodal-only balance and the mix-aware one (``layer_split:
auto``) side by side, over the run's step mix (read from the data when it is there), from the cost model of
``pipeline_cost.py`` or from per-part times measured on this machine (``--measure``)."""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlpretrain.config import Config, ConfigError, trainable_parts
from vlpretrain.data.step_mix import StepType, assumed_mix, measured_mix
from vlpretrain.data.synthetic import synthetic_microbatches
from vlpretrain.errors import UserError
from vlpretrain.models.vlm import build_model, set_trainable
from vlpretrain.parallel.engine import use_bf16
from vlpretrain.parallel.mesh import resolve_layout
from vlpretrain.parallel.pipeline_cost import EFFICIENCY, PartCost, part_costs, part_parameters, peak_tflops, predict
from vlpretrain.parallel.pipeline_split import part_names, partition_details, stage_style, uniform_split
from vlpretrain.parallel.pipeline_split_mix import mix_costs, partition_mix

# ---------------------------------------------------------------------------------------------------------------
# Measurement


class _PartTimer:
    """One synthetic microbatch through the model part by part: each part's forward and backward timed alone."""

    def __init__(self, cfg: Config, dev: torch.device, seed: int, images_per_sample: int):
        self.dev, self.names = dev, part_names(cfg.model.n_layers)
        self.model = build_model(cfg.model, dev, seed=seed)
        set_trainable(self.model, trainable_parts(cfg))
        self.model.train()
        (mb,), _ = synthetic_microbatches(cfg, seed, images_per_sample, num_samples=cfg.train.micro_batch_size)
        self.tokens, self.labels = mb.tokens.to(dev), mb.labels.to(dev)
        self.images = mb.images.to(dev) if mb.images is not None else None
        self.bf16 = use_bf16(cfg, dev)
        self.ckpt = cfg.parallel.activation_checkpointing == "full"

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def _run_part(self, name: str, x):
        if name == "embed":
            return self.model.embed(self.tokens, self.images)
        if name == "head":
            logits = self.model.head(x)
            return F.cross_entropy(logits.float().flatten(0, 1), self.labels.flatten(), ignore_index=-100)
        layer = self.model.layers[name.split(".", 1)[1]]
        if self.ckpt and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(layer, x, use_reentrant=False)
        return layer(x)

    def _forward(self) -> tuple[list, list, list[float]]:
        """Each part's input is the previous output detached (requiring grad when that did)."""
        inputs, outputs, seconds, x = [], [], [], None
        for name in self.names:
            if x is not None:
                x = x.detach().requires_grad_(x.requires_grad)
            inputs.append(x)
            self._sync()
            t0 = time.perf_counter()
            with torch.autocast(device_type=self.dev.type, dtype=torch.bfloat16, enabled=self.bf16):
                x = self._run_part(name, x)
            self._sync()
            seconds.append(time.perf_counter() - t0)
            outputs.append(x)
        return inputs, outputs, seconds

    def _backward(self, inputs: list, outputs: list) -> list[float]:
        """From the end, each part with the grad of the next part's input (a part whose output needs no grad
        runs no backward)."""
        seconds, grad = [0.0] * len(self.names), None
        for i in range(len(self.names) - 1, -1, -1):
            if outputs[i].requires_grad:
                self._sync()
                t0 = time.perf_counter()
                torch.autograd.backward(outputs[i], grad)
                self._sync()
                seconds[i] = time.perf_counter() - t0
            inp = inputs[i]
            grad = inp.grad if inp is not None else None
            if inp is not None and grad is None and inp.requires_grad:
                grad = torch.zeros_like(inp)
        return seconds

    def step(self) -> list[float]:
        """Forward + backward seconds per part."""
        self.model.zero_grad(set_to_none=True)
        inputs, outputs, fwd = self._forward()
        bwd = self._backward(inputs, outputs)
        self.model.zero_grad(set_to_none=True)
        return [f + b for f, b in zip(fwd, bwd)]


def measure_part_times(cfg: Config, steps: int = 3, device: str = "cpu", images_per_sample: int = 1,
                       seed: int = 0, max_cpu_params: int = 500_000_000) -> dict[str, float]:
    """Measured forward+backward seconds per part for one synthetic microbatch, median of ``steps`` after one
    warm-up (decoder layers: the median over all layers' samples, since every block costs the same). Parts run
    one at a time (``_PartTimer``), so every part is timed alone. Frozen parts follow ``trainable_parts``.
    ``full`` activation checkpointing wraps decoder layers in ``torch.utils.checkpoint``. Real model weights are
    built: on CPU, models over ``max_cpu_params`` parameters are refused (ValueError). Measured times are used as
    they are (no division by tp)."""
    dev = torch.device(device)
    n_params = sum(sum(g.values()) for g in part_parameters(cfg.model).values())
    if dev.type == "cpu" and n_params > max_cpu_params:
        raise ValueError(f"measuring {cfg.model.name} ({n_params / 1e9:.1f}B parameters) on CPU would build the full "
                         f"model in memory: measure on a GPU, or a smaller config (e.g. --set model.n_layers=2)")
    timer = _PartTimer(cfg, dev, seed, images_per_sample)
    timer.step()  # warm-up
    runs = [timer.step() for _ in range(steps)]
    samples = {name: [r[i] for r in runs] for i, name in enumerate(timer.names)}
    times = {n: statistics.median(v) for n, v in samples.items()}
    # decoder blocks are the same computation: one median over all their samples, so that timer noise on one
    # block (a few ms on CPU) does not move the split
    layers = [t for n, v in samples.items() if n.startswith("layers.") for t in v]
    if layers:
        pooled = statistics.median(layers)
        times.update({n: pooled for n in times if n.startswith("layers.")})
    return times


# ---------------------------------------------------------------------------------------------------------------
# The ``vlpretrain plan`` report


def step_mix(cfg: Config, images_per_sample: float = 1.0, read_data: bool = True) -> tuple[list[StepType], str]:
    """The run's step types, measured from the data when it can be read, else assumed; and a one-line note
    saying which (with the reason the data was not used)."""
    if read_data:
        try:
            return measured_mix(cfg), ""
        except (UserError, OSError, ValueError, RuntimeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            return assumed_mix(cfg, images_per_sample), f"no data ({reason})"
    return assumed_mix(cfg, images_per_sample), "data not read"


def _expected(cfg: Config, split: list[int], costs: list[list[PartCost]], mix: list[StepType], n_mb: int,
              dp: int) -> dict | None:
    """``predict`` per step type, combined: expected step and rank times, the largest memory of any type."""
    try:
        per = [predict(cfg, split, c, n_mb, dp) for c in costs]
    except ConfigError:
        return None
    w = [st.share / sum(x.share for x in mix) for st in mix]
    pp = cfg.parallel.pp
    return {"split": list(split), "rank_layers": per[0]["rank_layers"], "n_microbatches": n_mb, "dp": dp,
            "stage_time": [sum(wt * p["stage_time"][r] for wt, p in zip(w, per)) for r in range(pp)],
            "stage_memory": [max(p["stage_memory"][r] for p in per) for r in range(pp)],
            "step_time": sum(wt * p["step_time"] for wt, p in zip(w, per)),
            "step_time_by_type": {st.name: p["step_time"] for st, p in zip(mix, per)}}


def plan(cfg: Config, measured: dict[str, float] | None = None, world_size: int | None = None,
         images_per_sample: float = 1.0, mix: list[StepType] | None = None, read_data: bool = True) -> dict:
    """The uniform split, the multimodal-only balance (one multimodal step of ``images_per_sample`` images per
    sample: the previous ``auto``) and the mix-aware ``auto`` split, each with its expected step time over the
    step mix. ``uniform`` / ``multimodal_only`` are None where invalid (an empty middle stage)."""
    note = ""
    if mix is None:
        mix, note = step_mix(cfg, images_per_sample, read_data)
    layout = resolve_layout(cfg, world_size, mix=assumed_mix(cfg, images_per_sample))  # what training runs
    n_mb, dp = layout.n_microbatches, layout.dp
    par = cfg.parallel
    v = par.pp * par.vpp
    costs = mix_costs(cfg, mix, measured, images_per_sample)
    det = partition_mix([[c.time_s for c in cs] for cs in costs], [st.share for st in mix], v, par.pp,
                        par.schedule, n_mb)
    mm_costs = part_costs(cfg, measured=measured, images_per_sample=images_per_sample)
    mm_only = partition_details([c.time_s for c in mm_costs], v, par.pp, stage_style(par.schedule))["split"]
    uniform = _expected(cfg, uniform_split(cfg.model.n_layers, v), costs, mix, n_mb, dp)
    return {"uniform": uniform, "multimodal_only": _expected(cfg, mm_only, costs, mix, n_mb, dp),
            "auto": _expected(cfg, det["split"], costs, mix, n_mb, dp), "auto_exact": det["exact"],
            "training_split": list(layout.split), "mix": mix, "mix_note": note, "costs": costs,
            "uniform_error": "" if uniform else "the uniform split leaves a middle virtual stage empty"}


def _gib(x: float) -> str:
    return f"{x / 2 ** 30:.1f} GiB" if x >= 2 ** 30 else f"{x / 2 ** 20:.1f} MiB"


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f} ms" if x < 10 else f"{x:.1f} s"


def _mix_line(mix: list[StepType], note: str, cfg: Config) -> str:
    parts = []
    for st in mix:
        what = "no images" if not st.images else f"{st.mean_images:.2f} images/microbatch"
        parts.append(f"{st.share * 100:.0f}% {st.name} ({what})")
    src = mix[0].note if mix else ""
    return f"step mix: {', '.join(parts)}; {src}" + (f"; {note}" if note else "")


def format_plan(cfg: Config, result: dict, images_per_sample: float = 1.0) -> str:
    par, t = cfg.parallel, cfg.train
    u, a, mo = result["uniform"], result["auto"], result["multimodal_only"]
    costs: list[list[PartCost]] = result["costs"]
    mix: list[StepType] = result["mix"]
    lines = [f"{cfg.model.name} stage {t.stage}: pp={par.pp} vpp={par.vpp} tp={par.tp} schedule={par.schedule} "
             f"dp={a['dp']}: {a['n_microbatches']} microbatches of {t.micro_batch_size}x{t.seq_len} tokens, "
             f"trainable {'+'.join(trainable_parts(cfg))}, vision_split={par.vision_split}"]
    lines.append(_mix_line(mix, result.get("mix_note", ""), cfg))
    if costs and costs[0] and costs[0][0].measured:
        lines.append("times: measured on this machine (plan --measure)")
    else:
        lines.append(f"times: model FLOPs / ({peak_tflops(cfg):g} TFLOP/s peak x {EFFICIENCY:g} efficiency)")
    ref = costs[-1]
    layer = ref[1] if len(ref) > 2 else None
    embeds = ", ".join(f"{st.name} {_ms(c[0].time_s)}" for st, c in zip(mix, costs))
    rel = ""
    if layer is not None and layer.time_s > 0:
        rel = (f"  (embed = {ref[0].time_s / layer.time_s:.2f} layers in a {mix[-1].name} step, "
               f"head = {ref[-1].time_s / layer.time_s:.2f})")
    lines.append(f"per microbatch fwd+bwd: embed {embeds}" + (f", decoder layer {_ms(layer.time_s)}" if layer else "")
                 + f", head {_ms(ref[-1].time_s)}" + rel)
    note = "" if result.get("auto_exact", True) else "  (search budget hit: best found, not proven optimal)"
    lines.append(f"split uniform {u['split'] if u else 'invalid'}   multimodal-only "
                 f"{mo['split'] if mo else 'invalid'}   auto (mix-aware) {a['split']}{note}")
    if result.get("training_split") and result["training_split"] != a["split"]:
        lines.append(f"training's layer_split: auto does not read the data and picks {result['training_split']}; "
                     f"to train with this mix: --set parallel.layer_split={a['split']}")
    lines.append("")
    lines.append(f"{'rank':<6}{'uniform: layers':>16}{'time/mb':>11}{'memory':>11}  {'mm-only: layers':>16}"
                 f"{'time/mb':>11}  {'auto: layers':>13}{'time/mb':>11}{'memory':>11}")
    for r in range(par.pp):
        cols = []
        for res, mem in ((u, True), (mo, False), (a, True)):
            if res is None:
                cols.append(f"{'-':>16}{'':>11}" + (f"{'':>11}" if mem else ""))
                continue
            lay = "+".join(str(x) for x in res["rank_layers"][r])
            cols.append(f"{lay:>16}{_ms(res['stage_time'][r]):>11}"
                        + (f"{_gib(res['stage_memory'][r]):>11}" if mem else ""))
        lines.append(f"{r:<6}{cols[0]}  {cols[1]}  {cols[2][3:]}")
    lines.append("(time/mb: expected over the step mix; memory: the largest over the step types)")
    for name, res in (("uniform", u), ("multimodal-only", mo), ("auto", a)):
        if res is None:
            continue
        by = ", ".join(f"{k} {_ms(v)}" for k, v in res["step_time_by_type"].items())
        lines.append(f"step {name:<16} expected {_ms(res['step_time'])}  ({by})")
    if u is not None and u["step_time"] > 0 and a["step_time"] > 0:
        ratio = a["step_time"] / u["step_time"]
        lines.append(f"auto / uniform step time = {ratio:.3f}  ({(1 / ratio - 1) * 100:+.1f}% throughput)")
    if mo is not None and mo["step_time"] > 0 and a["step_time"] > 0:
        ratio = a["step_time"] / mo["step_time"]
        lines.append(f"auto / multimodal-only step time = {ratio:.3f}  ({(1 / ratio - 1) * 100:+.1f}% throughput)")
    return "\n".join(lines)
