"""Our LLaMA-style decoder vs transformers' LlamaForCausalLM: forward+backward time, same weights, same batch.

    python bench/decoder_vs_hf.py [--dim 256 --layers 4 --seq 256 --batch 4 --iters 10 --threads 2 --repeats 3]

Both models hold the same weights (HF's saved and loaded into ours with ``load_hf_llm``), fp32, on
``--threads`` torch threads; the logits are checked equal (max |diff| <= ``--tol``) before any timing. Then
``bench/_ab.py`` runs them interleaved (ours, HF, ours, HF ...) after a warm-up round; a repeat is ``--iters``
forward + backward steps (loss = mean of the squared logits, grads cleared each step as training does).
Reported: tokens/s and ms/step per side (median, min-max over repeats) and the ratio ours / HF in tokens/s
(> 1: ours faster; the goal is >= 1.0); the step-time ratio ours / HF is its inverse.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _ab  # noqa: E402

from vlpretrain.checkpoint.pretrained import load_hf_llm  # noqa: E402
from vlpretrain.config import config_from_dict  # noqa: E402
from vlpretrain.models.vlm import build_model  # noqa: E402


def steps(model: torch.nn.Module, logits, iters: int, tokens_per_step: int) -> dict:
    """``iters`` forward + backward steps; their mean as tokens/s and ms/step."""
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    for _ in range(iters):
        for p in params:
            p.grad = None
        logits().float().pow(2).mean().backward()
    dt = (time.perf_counter() - t0) / iters
    return {"tok_per_s": tokens_per_step / dt, "step_ms": dt * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10, help="forward + backward steps per repeat")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the issue's setting: 2)")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest |logits difference| accepted")
    _ab.add_args(ap, repeats=3, warmup=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ffn = int(8 * args.dim / 3)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=args.seq, tie_word_embeddings=False, attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_cfg).float()
    cfg = config_from_dict({"model": {
        "vocab_size": args.vocab, "dim": args.dim, "n_layers": args.layers, "n_heads": args.heads, "ffn_dim": ffn,
        "max_seq_len": args.seq, "image_token_id": 2,
        "siglip": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
        "sam": {"enabled": False}}, "train": {"seq_len": args.seq}})
    ours = build_model(cfg.model, "cpu", seed=0)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, safe_serialization=True)
        load_hf_llm(ours, d)
    # only the decoder is compared: the (untouched) vision towers take no part in a text-only forward
    tokens = torch.randint(3, args.vocab, (args.batch, args.seq))
    with torch.no_grad():
        a, b = ours(tokens), hf(tokens).logits
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        sys.exit(f"expected fp32 logits, got {a.dtype} and {b.dtype}")
    diff = (a - b).abs().max().item()
    print(f"decoder d={args.dim} L={args.layers} heads={args.heads} vocab={args.vocab} seq={args.seq} "
          f"batch={args.batch} fp32 threads={torch.get_num_threads()}; max |logits diff| {diff:.2e}", flush=True)
    if not diff <= args.tol:
        sys.exit(f"logits differ by {diff:.2e} > {args.tol:g}: the two models do not compute the same function")
    tok = args.batch * args.seq
    variants = {"ours": lambda: steps(ours, lambda: ours(tokens), args.iters, tok),
                "hf": lambda: steps(hf, lambda: hf(tokens).logits, args.iters, tok)}
    res = _ab.interleave(variants, args.repeats, args.warmup)
    print(_ab.table(res, ["tok_per_s", "step_ms"]))
    rec = _ab.record("decoder_vs_hf", {"threads": torch.get_num_threads(), "dim": args.dim, "layers": args.layers,
                                       "seq": args.seq, "batch": args.batch}, res, "ours", "hf", "tok_per_s",
                     goal=1.0, step_time_ratio=round(1 / _ab.compare(_ab.column(res, "ours", "tok_per_s"),
                                                                     _ab.column(res, "hf", "tok_per_s"))["ratio"], 4),
                     max_logits_diff=diff)
    print(_ab.ratio_line(rec) + f"; step time ours / HF {rec['step_time_ratio']:.3f}")
    _ab.emit([rec])


if __name__ == "__main__":
    main()
