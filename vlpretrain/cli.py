"""Command line: ``vlpretrain {train, info, config show, eval}`` (also ``python -m vlpretrain``).

Config errors print one line and exit with status 2 before any expensive work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from vlpretrain.config import Config, ConfigError, load_config, trainable_parts


def _add_config_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("config", help="YAML config file")
    else:
        p.add_argument("--config", "-c", required=True, help="YAML config file")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override config values, e.g. --set train.lr=1e-4 parallel.tp=2")


def cmd_train(args: argparse.Namespace, cfg: Config) -> int:
    from vlpretrain.train.trainer import train

    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # one summary line per job, from rank 0
        return 0
    print(json.dumps({"train": "done", **{k: v for k, v in summary.items() if k != "eval"},
                      **({"mcppl_accuracy": summary["eval"]["accuracy"]} if "eval" in summary else {})}))
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
    from vlpretrain.data.loader import resolve
    from vlpretrain.data.tokenizer import TextTokenizer
    from vlpretrain.eval.mcppl import evaluate_mcppl
    from vlpretrain.models.vlm import build_model
    from vlpretrain.train.checkpoint import load_weights
    from vlpretrain.parallel.mesh import local_device

    device = local_device(cfg)
    tokenizer = TextTokenizer(resolve(cfg.data.root, cfg.data.tokenizer))
    path = args.eval_file or (resolve(cfg.data.root, cfg.train.eval_file) if cfg.train.eval_file else None)
    if path is None:
        raise ConfigError("config error: train.eval_file is empty and no --eval-file given")
    model = build_model(cfg.model, device, seed=cfg.train.seed)
    if args.weights:
        load_weights(model, args.weights)
    result = evaluate_mcppl(model, cfg, tokenizer, path, device, limit=args.limit)
    print(json.dumps({"eval": "mcppl", "weights": args.weights or "random-init", **result}))
    return 0


def cmd_plan(args: argparse.Namespace, cfg: Config) -> int:
    from vlpretrain.parallel.plan import format_plan, measure_part_times, plan

    measured = None
    try:
        if args.measure:
            import torch

            measured = measure_part_times(cfg, device="cuda" if torch.cuda.is_available() else "cpu",
                                          images_per_sample=round(args.images_per_sample))
        result = plan(cfg, measured=measured, world_size=args.world_size, images_per_sample=args.images_per_sample)
    except ValueError as e:  # ConfigError is handled by main()
        if isinstance(e, ConfigError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        keys = ("split", "stage_time", "stage_memory", "step_time")
        print(json.dumps({name: ({k: result[name][k] for k in keys} if result[name] else None)
                          for name in ("uniform", "auto")}))
        return 0
    print(format_plan(cfg, result, args.images_per_sample))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlpretrain", description="DeepSeek-VL-style VLM pretraining")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one stage (under torchrun for several processes)")
    _add_config_args(p)
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
    p = sub.add_parser("eval", help="multi-choice perplexity evaluation")
    _add_config_args(p)
    p.add_argument("--weights", default="", help="checkpoint dir or .safetensors (default: random init)")
    p.add_argument("--eval-file", default="", help="jsonl multi-choice set (default: train.eval_file)")
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("plan", help="pipeline layer split: uniform vs vision-aware balance (meta device)")
    _add_config_args(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--measure", action="store_true", help="time each part on this machine (tiny models)")
    p.add_argument("--world-size", type=int, default=None, help="GPUs in all (for dp: auto); default dp=1")
    p.add_argument("--images-per-sample", type=float, default=1.0, help="expected images per sequence")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        return args.func(args, cfg)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
