"""Our LLaMA-style decoder vs transformers' LlamaForCausalLM: forward+backward time, same weights, same run.

    python bench/decoder_vs_hf.py [--dim 256 --layers 4 --seq 256 --batch 4 --iters 10]

Prints each side's median step time and the ratio (ours / HF; < 1 means ours is faster), plus the max logits
difference as a check that both compute the same function.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers

from vlpretrain.config import config_from_dict
from vlpretrain.models.pretrained import load_hf_llm
from vlpretrain.models.vlm import build_model


def time_fwd_bwd(fn, iters: int) -> float:
    times = []
    for i in range(iters + 2):
        t0 = time.perf_counter()
        fn().float().pow(2).mean().backward()
        if i >= 2:  # two warm-up iterations
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
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
    tokens = torch.randint(3, args.vocab, (args.batch, args.seq))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    t_ours = time_fwd_bwd(lambda: ours(tokens), args.iters)
    t_hf = time_fwd_bwd(lambda: hf(tokens).logits, args.iters)
    tok = args.batch * args.seq
    print(f"decoder d={args.dim} L={args.layers} seq={args.seq} batch={args.batch} threads={torch.get_num_threads()}")
    print(f"  ours: {t_ours * 1e3:8.1f} ms/step  {tok / t_ours:10,.0f} tok/s")
    print(f"  HF:   {t_hf * 1e3:8.1f} ms/step  {tok / t_hf:10,.0f} tok/s")
    print(f"  ratio ours/HF step time: {t_ours / t_hf:.3f}   max |logits diff|: {diff:.2e}")


if __name__ == "__main__":
    main()
