"""Peak memory per rank of streaming weights into and out of a 4-rank layout, at DeepSeek-VL-1.3B size.

    python bench/weights_memory.py [--layout dp=2,tp=2,pp=1] [--layers 8] [--dir /tmp]

1. Writes a HF LLaMA directory of the 1.3B LLM (vocab 102400, dim 2048, 24 layers, ffn 5504; bf16, two
   shards) tensor by tensor.
2. Under torchrun (4 ranks on this CPU, gloo), each rank builds its part of the 1.3B VLM (SigLIP-L + adaptor +
   LLM, fp32) in the layout, then:
   - load: ``train.pretrained.llm`` (what the trainer runs: ``load_pretrained_parts`` on each stage);
   - save: the end-of-training ``model.safetensors`` (``write_full_weights``). The previous way
     (``get_model_state_dict(full_state_dict=True)``, then gathered to rank 0) held the stage's full weights on
     every rank (printed as "old": computed, as it does not fit here at 4 ranks beside the model).
   Each phase resets the peak (``/proc/self/clear_refs``) and reads ``VmHWM``: the peak minus the RSS the
   process had before the model existed (Python + torch) is set against this rank's share (the bytes of its
   local shards) + the largest full tensor (the fp32 embedding, 839 MB).
3. ``vlpretrain ckpt export --format hf`` of the saved weights, in a child process: its peak RSS against the
   same child's RSS after imports.
The goal (issue 11): peak <= share + largest tensor + 20% for every rank and phase. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1 << 20


def rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def write_llm(cfg, out: Path) -> None:
    from vlpretrain.checkpoint.safetensors_stream import save_streaming
    from vlpretrain.models.state_dict_adapter import hf_llama_key_map
    from vlpretrain.models.vlm import build_model

    out.mkdir(parents=True, exist_ok=True)
    shapes = {k: tuple(v.shape) for k, v in build_model(cfg, "meta").state_dict().items()}
    names = sorted(hf_llama_key_map(cfg.n_layers).items())
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    gen = torch.Generator().manual_seed(0)
    for file, pairs in files.items():
        specs = {hf: (shapes[ours], torch.bfloat16) for hf, ours in pairs}
        save_streaming(out / file, ((hf, (torch.randn(specs[hf][0], generator=gen) * 0.02).bfloat16())
                                    for hf, _ in pairs), specs)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {hf: f for f, pairs in files.items() for hf, _ in pairs}}))
    (out / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "intermediate_size": cfg.ffn_dim,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta}))


def load_cfg(layout: str, layers: int):
    from vlpretrain.config import load_config

    sets = [f"parallel.{kv}" for kv in layout.split(",")] + [f"model.n_layers={layers}", "train.device=cpu",
                                                              "parallel.activation_checkpointing=none"]
    return load_config(ROOT / "configs/deepseek-vl-1.3b/stage2.yaml", sets)


def worker(args) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from vlpretrain.checkpoint.pretrained import load_pretrained_parts
    from vlpretrain.checkpoint.sharded_weights import write_full_weights
    from vlpretrain.parallel.engine import ParallelModel
    from vlpretrain.parallel.mesh import init_parallel

    torch.set_num_threads(1)
    cfg = load_cfg(args.layout, args.layers)
    ctx = init_parallel(cfg, torch.device("cpu"))
    base = rss()
    model = ParallelModel(cfg, ctx)
    local = [t.to_local() if isinstance(t, DTensor) else t for m in model.modules for t in m.state_dict().values()]
    share = sum(t.numel() * t.element_size() for t in local)
    largest = max(t.numel() * t.element_size() for m in model.modules for t in m.state_dict().values())
    full = sum(t.numel() * t.element_size() for m in model.modules for t in m.state_dict().values())
    row = {"rank": ctx.rank, "share_mb": share / MB, "largest_mb": largest / MB, "runtime_mb": base / MB,
           "stage_full_mb": full / MB,
           "built_peak_mb": (rss("VmHWM") - base) / MB}
    print(f"rank {ctx.rank}: model built, share {share / MB:.0f} MB, peak {row['built_peak_mb']:.0f} MB above "
          f"the runtime", file=sys.stderr, flush=True)

    def phase(name: str, fn) -> None:
        dist.barrier()
        reset_peak()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        row[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        row[f"{name}_peak_mb"] = (rss("VmHWM") - base) / MB
        print(f"rank {ctx.rank}: {name} peak {row[f'{name}_peak_mb']:.0f} MB", file=sys.stderr, flush=True)

    phase("load", lambda: [load_pretrained_parts(m, llm=args.llm) for m in model.modules])
    phase("save", lambda: write_full_weights(model.modules, ctx, Path(args.out) / "model.safetensors"))

    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if ctx.is_main:
        Path(args.out, "rows.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


_PEAK = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if p.returncode == 0 else -1)")


def child_peak(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS MB, seconds) of ``cmd`` alone (run under a fresh wrapper: its only child)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK, *cmd], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    kb = int(proc.stdout.strip().splitlines()[-1])
    if kb < 0:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr[-2000:]}")
    return kb / 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="dp=2,tp=2,pp=1")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--llm", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    cfg = load_cfg(args.layout, args.layers)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        d = Path(d)
        t0 = time.perf_counter()
        write_llm(cfg.model, d / "llm")
        print(f"wrote the {cfg.model.name} LLM ({args.layers} layers, bf16) in {time.perf_counter() - t0:.0f} s",
              flush=True)
        (d / "out").mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", __file__,
               "--worker", "--layout", args.layout, "--layers", str(args.layers), "--llm", str(d / "llm"),
               "--out", str(d / "out")]
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        rows = json.loads((d / "out" / "rows.json").read_text())
        imports = [sys.executable, "-c", "import vlpretrain.cli, vlpretrain.checkpoint.deepseek_vl, torch"]
        base_mb, _ = child_peak(imports)
        (d / "cfg.yaml").write_text(cfg.to_yaml())
        peak_mb, secs = child_peak([sys.executable, "-m", "vlpretrain", "ckpt", "export", str(d / "out"),
                                    "--config", str(d / "cfg.yaml"), "--format", "hf", "--out", str(d / "hf"),
                                    "--set", "train.init_from=", "train.eval_file=", "train.eval_text="])
    print(f"layout {args.layout}, {args.layers} layers; MB above the runtime's RSS (python + torch); "
          f"goal: peak <= (share + largest) x 1.2")
    print(f"{'rank':>4} {'share':>7} {'largest':>7} {'bound':>7} {'load':>7} {'save':>7} {'old':>7} {'built':>7}")
    ok = True
    for r in rows:
        bound = (r["share_mb"] + r["largest_mb"]) * 1.2
        ok &= r["load_peak_mb"] <= bound and r["save_peak_mb"] <= bound
        print(f"{r['rank']:>4} {r['share_mb']:>7.0f} {r['largest_mb']:>7.0f} {bound:>7.0f} {r['load_peak_mb']:>7.0f} "
              f"{r['save_peak_mb']:>7.0f} {r['share_mb'] + r['stage_full_mb']:>7.0f} {r['built_peak_mb']:>7.0f}")
    largest = rows[0]["largest_mb"]
    export_extra = peak_mb - base_mb
    print(f"ckpt export (1 process): peak {export_extra:.0f} MB above its imports ({peak_mb:.0f} MB total), "
          f"bound: largest x 1.2 = {largest * 1.2:.0f} MB; {secs:.0f} s")
    ok &= export_extra <= largest * 1.2
    print(json.dumps({"layout": args.layout, "layers": args.layers, "ranks": rows, "export_peak_mb": export_extra,
                      "export_s": round(secs, 1), "within_goal": ok}))


if __name__ == "__main__":
    main()
