"""Command line: ``vlpretrain {train, info, config show, eval, generate, plan, ckpt, report}`` (also
``python -m vlpretrain``).

Config errors print one line and exit with status 2 before any expensive work.
"""
from __future__ import annotations

import argparse
import json
import sys

from vlpretrain.config import Config, ConfigError, load_config, trainable_parts
from vlpretrain.errors import RunFault, UserError
from vlpretrain.parallel.launch_env import global_rank


def _add_config_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("config", help="YAML config file")
    else:
        p.add_argument("--config", "-c", required=True, help="YAML config file")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override config values, e.g. --set train.lr=1e-4 parallel.tp=2 (repeatable: every "
                        "--set counts, a later value of the same key wins)")


def cmd_train(args: argparse.Namespace, cfg: Config) -> int:
    from vlpretrain.train.trainer import train

    summary = train(cfg)
    if global_rank() != 0:  # one summary line per job, from rank 0
        return 0
    evals = {k: v for k, v in summary.get("eval", {}).items() if k in ("mcppl_accuracy", "text_bpb", "text_ppl")}
    print(json.dumps({"train": "done", **{k: v for k, v in summary.items() if k != "eval"}, **evals}))
    return 0


def cmd_info(args: argparse.Namespace, cfg: Config) -> int:
    from vlpretrain.models.vlm import PARTS, build_model, count_parameters

    model = build_model(cfg.model, "meta")
    counts = count_parameters(model)
    trainable = trainable_parts(cfg)
    info = {
        "model": cfg.model.name, "stage": cfg.train.stage, "parameters": counts,
        "trainable": {p: p in trainable for p in PARTS},
        "trainable_parameters": sum(counts[p] for p in PARTS if p in trainable),
        "image_tokens": cfg.model.image_tokens, "image_size": cfg.model.image_size,
        "hybrid_vision": cfg.model.sam.enabled,
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{cfg.model.name}  stage {cfg.train.stage}  ({cfg.model.image_tokens} tokens per "
          f"{cfg.model.image_size}px image)")
    print(f"{'part':<10}{'parameters':>16}  trainable")
    for p in (*PARTS, "total"):
        mark = "" if p == "total" else ("yes" if p in trainable else "frozen")
        print(f"{p:<10}{counts[p]:>16,}  {mark}")
    print(f"{'trainable':<10}{info['trainable_parameters']:>16,}")
    return 0


def cmd_config_show(args: argparse.Namespace, cfg: Config) -> int:
    print(cfg.to_yaml(), end="")
    return 0


def cmd_eval(args: argparse.Namespace, cfg: Config) -> int:
    import torch.distributed as dist

    from vlpretrain.checkpoint.weights import load_weights
    from vlpretrain.data.loader import resolve
    from vlpretrain.data.tokenizer import TextTokenizer
    from vlpretrain.eval.evaluator import Evaluator
    from vlpretrain.parallel.engine import ParallelModel
    from vlpretrain.parallel.mesh import init_parallel, local_device

    path = args.eval_file or (resolve(cfg.data.root, cfg.train.eval_file) if cfg.train.eval_file else None)
    text = args.eval_text or (resolve(cfg.data.root, cfg.train.eval_text) if cfg.train.eval_text else None)
    if path is None and text is None:
        raise ConfigError("config error: train.eval_file and train.eval_text are empty and no --eval-file or "
                          "--eval-text given")
    # any checkpoint (or the random init), evaluated in this process's layout (one process, or every rank
    # under torchrun / srun); a bad eval file fails before the model is built
    evaluator = Evaluator(cfg, TextTokenizer(resolve(cfg.data.root, cfg.data.tokenizer)), path, text, args.limit)
    model = ParallelModel(cfg, init_parallel(cfg, local_device(cfg)))
    if args.weights:
        for m in model.modules:
            load_weights(m, args.weights)
    try:
        result = evaluator.run(model)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if global_rank() == 0:  # one line per job
        print(json.dumps({"eval": "mcppl" if "mcppl" in result else "text", "weights": args.weights or "random-init",
                          **result.get("mcppl", {}), **({"text": result["text"]} if "text" in result else {}),
                          "eval_time_s": result["eval_time_s"]}))
    return 0


def cmd_generate(args: argparse.Namespace, cfg: Config) -> int:
    import torch

    from vlpretrain.checkpoint.weights import load_weights
    from vlpretrain.data.loader import resolve
    from vlpretrain.data.tokenizer import TextTokenizer
    from vlpretrain.eval.generate import generate, load_images, prompt_ids
    from vlpretrain.models.vlm import build_model

    tok = TextTokenizer(resolve(cfg.data.root, cfg.data.tokenizer))
    images = load_images(args.image, cfg.model)
    ids = prompt_ids(tok, cfg.model, args.prompt, len(args.image), chat=not args.raw,
                     system_prompt=cfg.data.system_prompt)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(cfg.model, device).eval()
    load_weights(model, args.weights)
    new = generate(model, ids, images, args.max_new_tokens, eos_id=tok.eos_id)
    text = tok.decode([t for t in new if t != tok.eos_id])
    if args.json:
        print(json.dumps({"weights": args.weights, "prompt_tokens": len(ids), "new_tokens": new, "text": text}))
    else:
        print(text)
    return 0


def _cluster(args: argparse.Namespace):
    from vlpretrain.planning.cluster import get_cluster

    return get_cluster(args.gpu, args.cluster, gpus_per_node=args.gpus_per_node, peak_tflops=args.gpu_peak_tflops,
                       mem_gib=args.gpu_mem_gib, intra_gbps=args.intra_gbps, inter_gbps=args.inter_gbps,
                       intra_latency_us=args.intra_latency_us, inter_latency_us=args.inter_latency_us)


def cmd_plan_search(args: argparse.Namespace, cfg: Config) -> int:
    from vlpretrain.planning.output import format_search, json_line, write_config, write_sbatch
    from vlpretrain.planning.search import search

    if not args.world_size or args.world_size < 1:
        raise UserError("plan --search: --world-size N (the job's GPUs) is required")
    if args.write_sbatch and not args.write_config:
        raise UserError("plan --write-sbatch: also give --write-config FILE (the job runs that config)")
    res = search(cfg, args.world_size, _cluster(args), top=args.top)
    if args.write_config:
        write_config(res, args.write_config)
    if args.write_sbatch:
        write_sbatch(res, args.write_sbatch, args.write_config)
    if not args.json:
        print(format_search(cfg, res))
        for what, path in (("config", args.write_config), ("job", args.write_sbatch)):
            if path:
                print(f"wrote {what} {path}")
    if args.json:
        print(json_line(res))
    return 0


def cmd_plan_evaluate(args: argparse.Namespace, cfg: Config) -> int:
    from vlpretrain.planning.search import describe, evaluate_config

    cl = _cluster(args)
    row = evaluate_config(cfg, args.world_size, cl)
    row["fits_memory"] = row["memory_gib"] <= cl.mem_gib
    if args.json:
        print(json.dumps(row))
        return 0
    print(f"{describe(row)}, layer_split {row['layer_split']}: {row['step_time_s']:.3f} s/step, "
          f"{row['tokens_per_s_per_gpu']:.0f} tokens/s per GPU, MFU {row['mfu']:.2f}, {row['memory_gib']:.1f} GiB "
          f"per GPU (compute {row['compute_s']:.3f} s, exposed communication {row['exposed_comm_s']:.3f} s, bubble "
          f"{row['bubble_s']:.3f} s)" + ("" if row["fits_memory"] else f"; does NOT fit {cl.mem_gib:g} GiB"))
    return 0


def cmd_plan(args: argparse.Namespace, cfg: Config) -> int:
    from vlpretrain.plan import format_plan, measure_part_times, plan

    if args.search:
        return cmd_plan_search(args, cfg)
    if args.evaluate:
        return cmd_plan_evaluate(args, cfg)
    measured = None
    try:
        if args.measure:
            import torch

            measured = measure_part_times(cfg, device="cuda" if torch.cuda.is_available() else "cpu",
                                          images_per_sample=round(args.images_per_sample))
        result = plan(cfg, measured=measured, world_size=args.world_size, images_per_sample=args.images_per_sample,
                      read_data=not args.no_data)
    except ValueError as e:  # ConfigError is handled by main()
        if isinstance(e, ConfigError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        keys = ("split", "stage_time", "stage_memory", "step_time")
        out = {name: ({k: result[name][k] for k in keys} if result[name] else None)
               for name in ("uniform", "multimodal_only", "auto")}
        out["mix"] = [{"name": st.name, "share": st.share, "images_per_microbatch": st.mean_images}
                      for st in result["mix"]]
        print(json.dumps(out))
        return 0
    print(format_plan(cfg, result, args.images_per_sample))
    return 0


def _step_dir(path_arg: str):
    """A step dir as given, or the newest good one under a checkpoints dir or run dir."""
    from pathlib import Path

    from vlpretrain.checkpoint.dcp import TRAIN_STATE, find_resumable

    path = Path(path_arg)
    return path if (path / TRAIN_STATE).is_file() else find_resumable(path, str(path))


def cmd_ckpt_inspect(args: argparse.Namespace) -> int:
    from vlpretrain.checkpoint.dcp import TRAIN_STATE, verify
    from vlpretrain.checkpoint.integrity import SafeReader
    from vlpretrain.checkpoint.weights import WEIGHTS
    from vlpretrain.errors import CheckpointError

    step_dir = _step_dir(args.path)
    problem = verify(step_dir)
    try:
        state = json.loads((step_dir / TRAIN_STATE).read_text())
        meta = SafeReader(str(step_dir)).read_metadata()  # checksum first, then no code can run
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint: one line
        raise CheckpointError(f"{step_dir}: {problem or f'unreadable ({type(e).__name__}: {e})'}") from None
    state = state if isinstance(state, dict) else {}
    files = [f for f in step_dir.iterdir() if f.is_file()]
    cfg = state.get("config", {})
    info = {"path": str(step_dir), "step": state.get("step"), "problem": problem,
            "layout": dict(zip(("dp", "tp", "pp", "vpp"), state.get("layout", []))), "split": state.get("split"),
            "model": cfg.get("model", {}).get("name"), "stage": cfg.get("train", {}).get("stage"),
            "consumed_samples": state.get("consumed_samples"),
            "data_epochs": state.get("data_state", {}).get("planner", {}).get("epochs"),
            "tensors": sum(1 for k in meta.state_dict_metadata if k.startswith("model.")),
            "optimizer_entries": sum(1 for k in meta.state_dict_metadata if k.startswith("optim.")),
            "bytes": sum(f.stat().st_size for f in files), "full_weights": (step_dir / WEIGHTS).is_file()}
    print(json.dumps(info, indent=None if args.json else 1))
    return 0


def cmd_ckpt_verify(args: argparse.Namespace) -> int:
    """Every file of a checkpoint against its manifest (sizes, checksums), its metadata and train state, and
    every tensor for NaN / infinity (a full read)."""
    from pathlib import Path

    from vlpretrain.checkpoint.dcp import TRAIN_STATE, step_dirs, verify
    from vlpretrain.checkpoint.weights import verified
    from vlpretrain.errors import CheckpointError

    path = Path(args.path)
    if path.is_file():  # a weights file: checked against a manifest beside it, if there is one
        verified(path)
        print(json.dumps({"verified": str(path)}))
        return 0
    if (path / TRAIN_STATE).is_file():
        dirs = [path]
    else:  # every checkpoint of a checkpoints dir or run dir
        ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        dirs = step_dirs(ckpts)
        if not dirs:
            raise CheckpointError(f"no checkpoint under {path}")
    problems = {str(d): verify(d, finite=True) for d in dirs}
    print(json.dumps({"verified": {d: p or "ok" for d, p in problems.items()}}))
    bad = [p for p in problems.values() if p]
    if bad:
        raise CheckpointError(f"{len(bad)} of {len(dirs)} checkpoints damaged: {bad[0]}")
    return 0


def _export_tokenizer(args: argparse.Namespace, cfg: Config):
    """--tokenizer, else the config's data.tokenizer when that file exists (a DeepSeek-VL export then carries
    the processor's tokenizer files; without one, a warning)."""
    from pathlib import Path

    from vlpretrain.data.loader import resolve

    if args.tokenizer:
        if not Path(args.tokenizer).is_file():
            raise UserError(f"--tokenizer {args.tokenizer}: no such file")
        return Path(args.tokenizer)
    tok = resolve(cfg.data.root, cfg.data.tokenizer)
    if tok.is_file():
        return tok
    print(f"warning: {tok} not found: the export has no tokenizer files (give --tokenizer)", file=sys.stderr)
    return None


def cmd_ckpt_export(args: argparse.Namespace, cfg: Config) -> int:
    from vlpretrain.checkpoint.deepseek_vl import export_deepseek_vl
    from vlpretrain.checkpoint.hf_llama import export_hf_llama
    from vlpretrain.checkpoint.weights import find_weights, verified

    weights = verified(find_weights(args.path))  # checksums first; then streamed tensor by tensor, no model
    export = export_hf_llama if args.format == "hf" else export_deepseek_vl
    tok = _export_tokenizer(args, cfg) if args.format == "deepseek-vl" else None
    kw = {"tokenizer": tok, "allow_nonrelease": args.allow_nonrelease} if args.format == "deepseek-vl" else {}
    export(weights, cfg.model, args.out, **{k: v for k, v in kw.items() if v})
    print(json.dumps({"exported": args.path, "format": args.format, "out": args.out,
                      **({"tokenizer": str(tok)} if tok else {})}))
    return 0


def cmd_ckpt_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from vlpretrain.checkpoint.deepseek_vl import import_deepseek_vl
    from vlpretrain.checkpoint.weights import save_checkpoint
    from vlpretrain.config import config_from_dict
    from vlpretrain.models.vlm import build_model

    model_section, state = import_deepseek_vl(args.path, tokenizer_out=Path(args.out) / "tokenizer.json")
    cfg = config_from_dict({"model": model_section, "train": {"seq_len": model_section.get("max_seq_len", 4096)}})
    model = build_model(cfg.model, "meta")
    model.load_state_dict(state, assign=True)
    step_dir = save_checkpoint(model, Path(args.out), 0, {"imported_from": args.path}, keep_last=1)
    (Path(args.out) / "model.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()["model"]}, sort_keys=False))
    print(json.dumps({"imported": args.path, "checkpoint": str(step_dir),
                      "model_config": str(Path(args.out) / "model.yaml")}))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from vlpretrain.report import write_report

    print(json.dumps(write_report(args.run_dirs, args.out)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlpretrain", description="DeepSeek-VL-style VLM pretraining")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one stage (under torchrun for several processes)")
    _add_config_args(p)
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the newest good checkpoint of the run (auto) or from PATH")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run dir that holds a run: the old run is moved aside to <run_dir>.old-<time> "
                        "(checkpoint.overwrite=true)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("info", help="parameter counts per part (meta device, instant)")
    _add_config_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("config", help="config tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    p = csub.add_parser("show", help="print the resolved config")
    _add_config_args(p, positional=True)
    p.set_defaults(func=cmd_config_show)
    p = sub.add_parser("eval", help="MCPPL and held-out text bits/byte of any checkpoint, in any layout")
    _add_config_args(p)
    p.add_argument("--weights", default="", help="checkpoint dir or .safetensors (default: random init)")
    p.add_argument("--eval-file", default="", help="jsonl multi-choice set (default: train.eval_file)")
    p.add_argument("--eval-text", default="",
                   help="held-out text: jsonl or .bin/.idx prefix (default: train.eval_text)")
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("generate", help="greedy answer of a checkpoint to a prompt (one process, KV cache)")
    _add_config_args(p)
    p.add_argument("--weights", required=True, help="checkpoint dir or .safetensors")
    p.add_argument("--prompt", required=True, help="the user's message (<image_placeholder> marks place images)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="continue the prompt as plain text, not as a chat turn")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("plan", help="pipeline layer split: uniform vs balance over the step mix (meta device)")
    _add_config_args(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--measure", action="store_true", help="time each part on this machine (tiny models)")
    p.add_argument("--world-size", type=int, default=None, help="GPUs in all (for dp: auto); default dp=1")
    p.add_argument("--images-per-sample", type=float, default=1.0,
                   help="images per multimodal sequence when the data is not read (and for --measure)")
    p.add_argument("--no-data", action="store_true", help="do not sample the data for the step mix")
    p.add_argument("--search", action="store_true",
                   help="rank every valid layout of --world-size GPUs on the cluster (docs/planning.md)")
    p.add_argument("--top", type=int, default=5, help="layouts to show with --search")
    p.add_argument("--evaluate", action="store_true",
                   help="the cost model's step time, MFU and memory of the config's own layout on the cluster")
    p.add_argument("--gpu", default="h100-sxm", help="GPU preset: a100-40gb, a100-80gb, h100-sxm, h200")
    p.add_argument("--cluster", default=None, help="YAML file of cluster fields (planning/cluster.py)")
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--gpu-peak-tflops", type=float, default=None, help="dense bf16 peak of another GPU")
    p.add_argument("--gpu-mem-gib", type=float, default=None)
    p.add_argument("--intra-gbps", type=float, default=None, help="collective bus bandwidth in a node, GB/s")
    p.add_argument("--inter-gbps", type=float, default=None, help="across nodes, GB/s per GPU")
    p.add_argument("--intra-latency-us", type=float, default=None)
    p.add_argument("--inter-latency-us", type=float, default=None)
    p.add_argument("--write-config", default=None, help="write the best layout's config here (with --search)")
    p.add_argument("--write-sbatch", default=None, help="write a Slurm job running it (with --search)")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("ckpt", help="checkpoint tools")
    csub = p.add_subparsers(dest="ckpt_command", required=True)
    p = csub.add_parser("inspect", help="step, layout, config and sizes of a checkpoint")
    p.add_argument("path", help="a checkpoint step dir, a checkpoints dir or a run dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ckpt_inspect, config=None)
    p = csub.add_parser("verify", help="check every file of a checkpoint against its manifest (exit 2 if damaged)")
    p.add_argument("path", help="a checkpoint step dir, a checkpoints dir, a run dir or a .safetensors file")
    p.set_defaults(func=cmd_ckpt_verify, config=None)
    p = csub.add_parser("export", help="as a HF LLaMA directory (the LLM) or in DeepSeek-VL's released layout")
    _add_config_args(p)
    p.add_argument("path", help="our checkpoint (step dir, checkpoints dir or run dir) or a .safetensors file")
    p.add_argument("--format", choices=["hf", "deepseek-vl"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default="", help="deepseek-vl: tokenizer.json to ship (default: data.tokenizer)")
    p.add_argument("--allow-nonrelease", action="store_true",
                   help="deepseek-vl: write towers their code cannot build (read back by our import only)")
    p.set_defaults(func=cmd_ckpt_export)
    p = csub.add_parser("import", help="DeepSeek-VL's released layout -> our weights checkpoint (for init_from)")
    p.add_argument("path", help="a DeepSeek-VL checkpoint directory (config.json + safetensors)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_ckpt_import, config=None)
    p = sub.add_parser("report", help="HTML page + PNG figures of one or more runs (overlaid), offline")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (metrics.jsonl, eval.jsonl)")
    p.add_argument("--out", required=True, help="output directory (index.html and the figures)")
    p.set_defaults(func=cmd_report, config=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.config is None:  # commands that need no config
            return args.func(args)
        overrides = list(args.overrides)
        if getattr(args, "resume", None):
            overrides.append(f"checkpoint.resume={args.resume}")
        if getattr(args, "overwrite", False):
            overrides.append("checkpoint.overwrite=true")
        cfg = load_config(args.config, overrides)
        if args.command != "train":
            return args.func(args, cfg)
        from vlpretrain.train.preemption import PREEMPTION

        # first thing, before torch, the model and the data load; the handlers are the command's, not the
        # calling process's (tests call main in-process)
        with PREEMPTION.handling(cfg.train.preempt_signals):
            return args.func(args, cfg)
    except UserError as e:  # config errors already start with "config error:"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(msg if isinstance(e, ConfigError) else f"error: {msg}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFault as e:  # a lost data worker or rank: its exit code (train/lost_processes.py)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: abort without a traceback
        print("aborted", file=sys.stderr)
        return 130
