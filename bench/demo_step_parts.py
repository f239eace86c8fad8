"""Where a step of the demo's stage 3 (SFT) goes: its parts timed on one real microbatch, round-robin.

Builds the demo's stage-3 run (configs/tiny/stage3.yaml: 32 samples x 96 tokens per step, two microbatches of
16, single process) from a stage-2 run dir, takes its first batch and times, interleaved part after part over
``--rounds`` rounds (median and min-max, ms):

- sam_fwd: the frozen SAM tower's forward on the microbatch's images (no graph: nothing in it trains);
- siglip_fwd_bwd: the SigLIP tower's forward + backward (it trains in stage 3);
- llm_layers_fwd_bwd: the decoder blocks' forward + backward on the microbatch's shape;
- head_ce_all / head_ce_supervised: final norm + vocabulary projection + cross-entropy over every position (what
  the engine does) and over the supervised positions only (SFT supervises ~6% of them);
- sdpa_flash / sdpa_math: causal attention fwd + bwd on one block's shape with each CPU kernel;
- step: the whole step's forward + backward (both microbatches, ``ParallelModel.forward_backward``);
- data / clip / optimizer: per step, over ``--steps`` training steps after the rounds.

    python bench/demo_step_parts.py --init runs/tiny-stage2 [--data demo_data] [--rounds 7] [--steps 10]

The last line is JSON (medians, ms). Run it alone: it times.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlpretrain.config import load_config  # noqa: E402
from vlpretrain.models.llm import rotary_cos_sin  # noqa: E402
from vlpretrain.train import trainer  # noqa: E402
from vlpretrain.train.rundir import RunDirLock  # noqa: E402


def _median_line(name: str, v: list[float]) -> str:
    return f"{name:22s} median {statistics.median(v):7.1f} ms  min-max {min(v):6.1f}-{max(v):6.1f}"


def _parts(run, cfg) -> dict:
    """The timed parts on the first microbatch of the run's first batch."""
    model = run.model.modules[0]
    emb = model.embed
    batch = next(run.batches)
    mb = batch.microbatches[0]
    tokens, labels = mb.tokens, mb.labels
    n_img = (tokens == emb.image_token_id).sum(1) // cfg.model.image_tokens
    pixels = mb.images[torch.arange(mb.images.shape[1])[None, :] < n_img[:, None]].float() / 255
    rope = rotary_cos_sin(torch.arange(tokens.shape[1])[None], cfg.model.head_dim, cfg.model.rope_theta)
    h0 = torch.randn(tokens.shape[0], tokens.shape[1], cfg.model.dim)
    q = torch.randn(tokens.shape[0], cfg.model.n_heads, tokens.shape[1], cfg.model.head_dim, requires_grad=True)
    keep = labels != -100

    def sam():
        with torch.no_grad():
            emb.vision.sam(pixels)

    def layers():
        x = h0.clone().requires_grad_()
        for layer in model.layers.values():
            x = layer(x, rope, None)
        x.sum().backward()

    def head(supervised_only: bool):
        x = h0.clone().requires_grad_()
        if supervised_only:
            loss = F.cross_entropy(model.head(x[keep]).float(), labels[keep], reduction="sum")
        else:
            loss = F.cross_entropy(model.head(x).float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   reduction="sum")
        loss.backward()

    def sdpa(backend):
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()

    shape = (f"microbatch {tuple(tokens.shape)}, {pixels.shape[0]} images, {int(keep.sum())} supervised tokens; "
             f"{len(batch.microbatches)} microbatches per step")
    return shape, {
        "sam_fwd": sam,
        "siglip_fwd_bwd": lambda: emb.vision.siglip(pixels).sum().backward(),
        "llm_layers_fwd_bwd": layers,
        "head_ce_all": lambda: head(False),
        "head_ce_supervised": lambda: head(True),
        "sdpa_flash": lambda: sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_math": lambda: sdpa(SDPBackend.MATH),
        "step": lambda: run.model.forward_backward(batch.microbatches, batch.num_label_tokens),
    }


def _train_steps(run, n: int) -> dict[str, list[float]]:
    """data / forward+backward / clip / optimizer of ``n`` real training steps (ms each)."""
    out: dict[str, list[float]] = {"data": [], "fwd_bwd": [], "clip": [], "optimizer": []}
    for _ in range(n):
        t = [time.perf_counter()]
        batch = next(run.batches)
        t.append(time.perf_counter())
        run.model.forward_backward(batch.microbatches, batch.num_label_tokens)
        t.append(time.perf_counter())
        run.model.clip_grad_norm_(run.cfg.train.grad_clip)
        t.append(time.perf_counter())
        for opt in run.optimizers:
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        for sched in run.schedulers:
            sched.step()
        t.append(time.perf_counter())
        for key, a, b in zip(out, t, t[1:]):
            out[key].append((b - a) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", required=True, help="a stage-2 run dir (train.init_from of stage 3)")
    ap.add_argument("--data", default=str(ROOT / "demo_data"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(ROOT / "configs" / "tiny" / "stage3.yaml",
                          [f"data.root={args.data}", f"train.run_dir={d}/stage3", f"train.init_from={args.init}"])
        tok, eval_paths, init_file, resume = trainer._check_inputs(cfg)
        lock = RunDirLock(Path(cfg.train.run_dir))
        lock.acquire()
        try:
            run = trainer._build(cfg, tok, eval_paths, init_file, resume, lock)
            shape, parts = _parts(run, cfg)
            times: dict[str, list[float]] = {k: [] for k in parts}
            for fn in parts.values():  # warm-up
                fn()
            for _ in range(args.rounds):
                for key, fn in parts.items():
                    t0 = time.perf_counter()
                    fn()
                    times[key].append((time.perf_counter() - t0) * 1e3)
            for opt in run.optimizers:
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            times.update(_train_steps(run, args.steps))
        finally:
            lock.release()
    print(f"threads {torch.get_num_threads()}; {shape}")
    for key, v in times.items():
        print(_median_line(key, v))
    print(json.dumps({"bench": "demo_step_parts", "threads": torch.get_num_threads(),
                      **{k: round(statistics.median(v), 2) for k, v in times.items()}}))


if __name__ == "__main__":
    main()
