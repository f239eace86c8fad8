"""The checks of ``bench/gpu_check.py``. Each fills ``out`` (printed as one JSON line by the runner, also when
the check fails or runs out of time) and stops taking new steps after ``deadline``."""
from __future__ import annotations

import time

import torch
from gpu_check_attention import attention_check
from gpu_check_steps import GIB, make_steps, run_baseline, run_engine, step_kinds

from vlpretrain.config import trainable_parts
from vlpretrain.train.metrics import device_peak_tflops


def _steps(ctx: dict):
    """The (warm-up, timed) steps every check shares: built once, multimodal then text warm-up first."""
    if "steps" not in ctx:
        a, cfg = ctx["a"], ctx["cfg"]
        warm = (["multimodal", "text"] * a.warmup)[:a.warmup]
        timed = step_kinds(a.steps, cfg.data.language_ratio.end)
        steps = make_steps(cfg, warm + timed, a.max_images, a.documents, seed=1, pin=ctx["device"].type == "cuda")
        ctx["steps"] = (steps[:len(warm)], steps[len(warm):])
    return ctx["steps"]


def _pattern(steps) -> dict:
    """T = all-text step, M = all-multimodal step, in order."""
    kinds = [s.kind for s in steps]
    return {"order": "".join("M" if k == "multimodal" else "T" for k in kinds), "text": kinds.count("text"),
            "multimodal": kinds.count("multimodal")}


def _goal(value, goal: float, at_least: bool = True) -> dict:
    met = None if value is None else (value >= goal if at_least else value <= goal)
    return {"value": value, "goal": goal, "met": met}


def check_stage2(ctx: dict, out: dict, deadline: float) -> None:
    """(a) the engine and the plain baseline on the same steps."""
    a, cfg, device = ctx["a"], ctx["cfg"], ctx["device"]
    try:
        from vlpretrain.models.attention import resolve_kind
        attention = resolve_kind(cfg.model.attention, device)
    except ImportError as e:
        attention = f"unknown (vlpretrain.models.attention: {type(e).__name__})"
    warm, timed = _steps(ctx)
    mm = [s for s in timed if s.kind == "multimodal"]
    peak = device_peak_tflops(cfg, device)
    out.update({
        "model": cfg.model.name, "trainable": trainable_parts(cfg), "dtype": cfg.train.dtype,
        "seq_len": cfg.train.seq_len, "rows_per_step": timed[0].rows if timed else 0,
        "micro_batch": cfg.train.micro_batch_size, "documents_per_row": a.documents,
        "warmup_steps": _pattern(warm), "timed_steps": _pattern(timed),
        "images_per_multimodal_step": round(sum(s.images for s in mm) / len(mm), 2) if mm else 0,
        "model.attention": cfg.model.attention, "attention_resolved": attention,
        "activation_checkpointing": cfg.parallel.activation_checkpointing, "peak_tflops": peak})
    now = time.perf_counter()
    out["engine"] = {}
    run_engine(cfg, device, warm, timed, peak, now + 0.55 * (deadline - now), out["engine"])
    out["baseline"] = {"what": "timm SigLIP (no_grad) + MLP adaptor + HF LlamaForCausalLM sdpa, autocast, "
                               "fused AdamW"}
    run_baseline(cfg, device, cfg.train.dtype == "bf16", warm, timed, peak, deadline, out["baseline"])
    e, b = out["engine"].get("tokens_per_s"), out["baseline"].get("tokens_per_s")
    ratio = round(e / b, 3) if e and b else None
    out["engine_over_baseline_tokens_per_s"] = ratio
    out["goals"] = {"engine_mfu": _goal(out["engine"].get("mfu"), ctx["goals"]["mfu"]),
                    "tokens_per_s_ratio": _goal(ratio, ctx["goals"]["ratio"])}


def check_attention(ctx: dict, out: dict, deadline: float) -> None:
    """(b) flex vs varlen vs sdpa_mask at the run's row length."""
    a, device = ctx["a"], ctx["device"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attention_check(ctx["cfg"], device, dtype, max(a.documents, 8), a.attn_iters, deadline, out)


def check_plan_memory(ctx: dict, out: dict, deadline: float) -> None:
    """(c) ``vlpretrain plan``'s predicted peak (the largest over the step types: static + one microbatch's
    activations at pp = 1) for (a)'s setting and step mix, vs (a)'s measured peak allocated."""
    from vlpretrain.data.step_mix import StepType
    from vlpretrain.plan import plan

    cfg = ctx["cfg"]
    _, timed = _steps(ctx)
    n_text = sum(s.kind == "text" for s in timed)
    per_mb = tuple(int((mb.tokens == cfg.model.image_token_id).sum()) // cfg.model.image_tokens
                   for s in timed if s.kind == "multimodal" for mb in s.microbatches)
    mix = []
    if n_text:
        mix.append(StepType("text", n_text / len(timed), (), "gpu_check steps"))
    if per_mb:
        mix.append(StepType("multimodal", 1 - n_text / len(timed), per_mb, "gpu_check steps"))
    res = plan(cfg, world_size=1, mix=mix, read_data=False)
    pred = res["auto"]["stage_memory"][0]
    out["predicted_peak_gib"] = round(pred / GIB, 3)
    out["predicted_by_type"] = {
        st.name: {"static_gib": round(sum(c.static_bytes for c in cs) / GIB, 3),
                  "activations_gib": round(sum(c.activation_bytes for c in cs) / GIB, 3)}
        for st, cs in zip(res["mix"], res["costs"])}
    eng = ctx["results"].get("stage2", {}).get("engine", {})
    measured = eng.get("peak_allocated_gib")
    out["measured_peak_allocated_gib"] = measured
    out["measured_peak_reserved_gib"] = eng.get("peak_reserved_gib")
    out["measured_after_step_gib"] = eng.get("allocated_after_step_gib")
    if measured:
        out["predicted_over_measured"] = round(pred / GIB / measured, 3)
        err = abs(pred / GIB / measured - 1)
        out["goals"] = {"rel_err": _goal(round(err, 3), ctx["goals"]["plan_memory_rel_err"], at_least=False)}
    else:
        out["note"] = ("no measured peak: " + ("CPU has no CUDA memory statistics" if ctx["device"].type == "cpu"
                                               else "check stage2 did not measure one"))


def check_te(ctx: dict, out: dict, deadline: float) -> None:
    """(d) transformer-engine decoder blocks, bf16 then FP8, vs the engine's own (a) figure."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        out["skipped"] = "transformer-engine not installed"
        return
    except Exception as e:  # noqa: BLE001 - installed but broken (e.g. no matching CUDA)
        out["skipped"] = f"transformer-engine does not import ({type(e).__name__}: {str(e)[:200]})"
        return
    device = ctx["device"]
    warm, timed = _steps(ctx)
    ours = ctx["results"].get("stage2", {}).get("engine", {}).get("tokens_per_s")
    out["ours_tokens_per_s"] = ours
    variants = (("te_bf16", ["model.impl=te"]), ("te_fp8", ["model.impl=te", "parallel.fp8=true"]))
    for i, (name, extra) in enumerate(variants):
        now = time.perf_counter()
        share = (deadline - now) / (len(variants) - i)
        res: dict = {"set": extra}
        out[name] = res
        try:
            cfg = ctx["build_config"](extra)
            run_engine(cfg, device, warm, timed, device_peak_tflops(cfg, device), now + share, res)
        except Exception as e:  # noqa: BLE001 - bf16 failing says nothing about fp8
            res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        t = res.get("tokens_per_s")
        if t and ours:
            res["over_ours_tokens_per_s"] = round(t / ours, 3)
