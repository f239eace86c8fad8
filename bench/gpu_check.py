"""One-GPU check, one JSON line per check (run through ``bench/gpu_check.sh``; under 8 minutes on an H100/H200).

  env           versions, GPU, its bf16 peak (``metrics.device_peak_tflops``)
  stage2        (a) DeepSeek-VL 1.3B stage 2 at real size (bf16, packed 4096-token rows, modality-grouped:
                all-text and all-multimodal steps): a few optimizer steps through ``ParallelModel`` (every
                degree 1) and, on the same steps in the same run, a plain PyTorch baseline (timm SigLIP frozen
                under no_grad -> MLP adaptor -> HF ``LlamaForCausalLM`` with sdpa, bf16 autocast, fused AdamW):
                tokens/s, MFU, peak memory; goals MFU >= 0.45 and engine/baseline tokens/s >= 1.2
  attention     (b) document-causal attention at S = 4096: flex vs varlen vs sdpa_mask (+ plain causal),
                forward+backward time and peak memory (``vlpretrain.models.attention.document_mask``)
  plan_memory   (c) ``vlpretrain plan``'s predicted peak memory for the (a) setting vs (a)'s measured peak;
                goal within 10%
  te            (d) with transformer-engine: the engine with ``model.impl: te`` (bf16) and ``parallel.fp8``
  summary       wall time, and the checks skipped or stopped by the time budget

Every check runs under its own time budget (a SIGALRM stops it; what it measured so far is printed) and in its
own try/except: a failure prints {"check": ..., "error": ...} and the next check runs.

    python bench/gpu_check.py [--budget-s 450] [--steps 10] [--accum 8]
    python bench/gpu_check.py --cpu-smoke     # every check on CPU at tiny size (the test runs this)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):  # bench helpers, and the package without installing it
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from vlpretrain.config import load_config  # noqa: E402
from vlpretrain.train.metrics import device_peak_tflops  # noqa: E402

STDOUT = sys.stdout  # JSON lines only; anything else a library prints goes to stderr
T_START = time.perf_counter()

# per check: (budget seconds on GPU, below this much time left the check is skipped)
BUDGETS = {"stage2": (240, 60), "attention": (60, 15), "plan_memory": (20, 5), "te": (120, 40)}
SMOKE_BUDGETS = {"stage2": (40, 5), "attention": (15, 2), "plan_memory": (10, 1), "te": (20, 2)}
GOALS = {"mfu": 0.45, "ratio": 1.2, "plan_memory_rel_err": 0.10}

# the tiny model of --cpu-smoke: the 1.3B architecture (SigLIP only) scaled down
SMOKE_MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=172", "model.vocab_size=512",
               "model.max_seq_len=256", "model.image_token_id=2", "model.siglip.image_size=32",
               "model.siglip.patch_size=8", "model.siglip.width=32", "model.siglip.depth=1", "model.siglip.heads=2"]


class OverBudget(BaseException):  # BaseException: a library's ``except Exception`` does not swallow it
    pass


def emit(obj: dict) -> None:
    STDOUT.write(json.dumps(obj, default=str) + "\n")
    STDOUT.flush()


def _on_alarm(signum, frame):
    raise OverBudget()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(HERE.parent / "configs" / "deepseek-vl-1.3b" / "stage2.yaml"))
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides KEY=VALUE (both sides)")
    ap.add_argument("--cpu-smoke", action="store_true", help="every check on CPU at tiny size, fp32")
    ap.add_argument("--budget-s", type=float, default=None, help="whole run (default 450; 50 with --cpu-smoke)")
    ap.add_argument("--seq", type=int, default=None, help="packed row length (default 4096; 256 smoke)")
    ap.add_argument("--micro", type=int, default=1, help="rows per microbatch")
    ap.add_argument("--accum", type=int, default=None, help="microbatches per step (default 8; 2 smoke)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps, one multimodal + one text first")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 smoke)")
    ap.add_argument("--max-images", type=int, default=6, help="a multimodal row carries 0..this many images")
    ap.add_argument("--documents", type=int, default=4, help="documents per packed row")
    ap.add_argument("--attn-iters", type=int, default=None, help="timed attention fwd+bwd (default 10; 1 smoke)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these checks")
    a = ap.parse_args(argv)
    smoke = a.cpu_smoke
    a.budget_s = a.budget_s or (50.0 if smoke else 450.0)
    a.seq = a.seq or (256 if smoke else 4096)
    a.accum = a.accum or (2 if smoke else 8)
    a.warmup = a.warmup if a.warmup is not None else (1 if smoke else 2)
    a.steps = a.steps or (2 if smoke else 10)
    a.attn_iters = a.attn_iters or (1 if smoke else 10)
    if smoke:
        a.max_images = min(a.max_images, 2)
    return a


def build_config(a: argparse.Namespace, extra: list[str] = ()):
    over = [f"train.seq_len={a.seq}", f"train.micro_batch_size={a.micro}",
            f"train.global_batch_size={a.micro * a.accum}", "train.init_from=", "parallel.dp=1", "parallel.pp=1",
            "parallel.tp=1", "train.pretrained.llm=", "train.pretrained.siglip=", "train.pretrained.sam=",
            "train.dtype=" + ("fp32" if a.cpu_smoke else "bf16")]
    if a.cpu_smoke:
        over += SMOKE_MODEL
    return load_config(a.config, over + list(a.set) + list(extra))


class Runner:
    """Runs each check under its budget and try/except; remembers what was skipped or stopped."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.budgets = SMOKE_BUDGETS if a.cpu_smoke else BUDGETS
        self.end = T_START + a.budget_s
        self.skipped: list[str] = []
        self.results: dict[str, dict] = {}

    def run(self, name: str, fn) -> None:
        if self.a.only is not None and name not in self.a.only:
            return
        budget, minimum = self.budgets[name]
        left = self.end - time.perf_counter()
        if left < minimum:
            self.skipped.append(name)
            emit({"check": name, "skipped": f"over the run's time budget ({left:.0f} s left, needs {minimum} s)"})
            return
        budget = min(budget, left)
        out: dict = {"check": name, "budget_s": round(budget, 1)}
        self.results[name] = out
        t0 = time.perf_counter()
        soft_deadline = t0 + 0.9 * budget  # loops stop taking new steps here; the alarm is the hard stop
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, budget)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                fn(out, soft_deadline)
        except OverBudget:
            out["error"] = f"over its time budget of {budget:.0f} s (results so far kept)"
            self.skipped.append(f"{name} (stopped)")
        except Exception as e:  # noqa: BLE001 - one failing check must not stop the others
            msg = str(e).splitlines()[0] if str(e) else ""
            out["error"] = f"{type(e).__name__}: {msg}"[:500]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        out["wall_s"] = round(time.perf_counter() - t0, 1)
        emit(out)


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cuda = torch.cuda.is_available() and not a.cpu_smoke
    if not cuda and not a.cpu_smoke:
        emit({"check": "env", "error": "no CUDA device: run on a GPU, or pass --cpu-smoke"})
        return 2
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    cfg = build_config(a)
    env = {"check": "env", "mode": "cpu-smoke" if a.cpu_smoke else "gpu", "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
           "peak_tflops": device_peak_tflops(cfg, device), "budget_s": a.budget_s}
    for mod in ("transformers", "timm", "transformer_engine"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            env[mod] = f"not importable ({type(e).__name__})"
    emit(env)
    from gpu_check_checks import check_attention, check_plan_memory, check_stage2, check_te

    runner = Runner(a)
    ctx = {"a": a, "cfg": cfg, "device": device, "build_config": lambda extra=(): build_config(a, extra),
           "results": runner.results, "goals": GOALS}
    runner.run("stage2", lambda out, dl: check_stage2(ctx, out, dl))
    runner.run("attention", lambda out, dl: check_attention(ctx, out, dl))
    runner.run("plan_memory", lambda out, dl: check_plan_memory(ctx, out, dl))
    runner.run("te", lambda out, dl: check_te(ctx, out, dl))
    emit({"check": "summary", "wall_s": round(time.perf_counter() - T_START, 1), "budget_s": a.budget_s,
          "skipped_or_stopped": runner.skipped,
          "errors": [k for k, v in runner.results.items() if "error" in v]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
