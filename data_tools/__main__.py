"""Command line: `python -m data_tools {demo,tokenizer,tokenize,convert,inspect,index} ...`."""

from __future__ import annotations

import argparse
import sys
import time

from vlpretrain.errors import UserError

from .demo_data import generate_demo
from .tokenizer import DEFAULT_VOCAB_SIZE, SPECIAL_TOKEN_IDS, train_from_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description="Demo data tools for vlpretrain.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="write the deterministic demo dataset and train its tokenizer")
    demo.add_argument("--out", required=True, help="output directory (created if missing)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--scale", type=float, default=1.0, help="multiplies every sample count")
    demo.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)

    tok = commands.add_parser("tokenizer", help="(re)train DIR/tokenizer.json from the data in DIR")
    tok.add_argument("--data", required=True, help="a directory written by the demo command")
    tok.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)

    from .tokenize_corpus import add_parser as add_tokenize_parser  # `tokenize`: JSONL -> Megatron .bin/.idx
    add_tokenize_parser(commands)

    from .convert import add_convert_parser  # `convert`: llava/jsonl/captions/demo -> webdataset shards
    from .inspect_data import add_inspect_parser  # `inspect`: shard counts, token lengths, sample grid
    add_convert_parser(commands)
    add_inspect_parser(commands)

    index = commands.add_parser("index", help="store every source's sample sizes (what the step planner reads) "
                                "for a training config, ahead of the run")
    index.add_argument("--config", required=True, help="training config (YAML)")
    index.add_argument("overrides", nargs="*", help="config overrides key=value, as for training")

    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (UserError, FileNotFoundError) as e:  # a bad input file: one line, no traceback
        print(f"error: {(str(e).splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "convert":
        from .convert import run_convert
        return run_convert(args)
    if args.command == "inspect":
        from .inspect_data import run_inspect
        return run_inspect(args)
    if args.command == "index":
        return _index(args)
    if args.command == "tokenize":
        from .tokenize_corpus import run as run_tokenize
        return run_tokenize(args)
    if args.command == "demo":
        print(f"writing demo data to {args.out} (seed={args.seed}, scale={args.scale})", flush=True)
        generate_demo(args.out, seed=args.seed, scale=args.scale, vocab_size=args.vocab_size)
    else:
        start = time.perf_counter()
        tokenizer = train_from_dir(args.data, args.vocab_size)
        print(f"wrote {args.data}/tokenizer.json: vocab {tokenizer.get_vocab_size()}, "
              f"special ids {SPECIAL_TOKEN_IDS} ({time.perf_counter() - start:.1f}s)")
    return 0


def _index(args: argparse.Namespace) -> int:
    """Open the config's sources as training does: missing or outdated size indexes are built and stored."""
    from vlpretrain.config import load_config
    from vlpretrain.data.loader import StepPlanner, resolve
    from vlpretrain.data.tokenizer import TextTokenizer

    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    planner = StepPlanner(cfg, TextTokenizer(resolve(cfg.data.root, cfg.data.tokenizer)))
    for src, table in zip(planner.sources, planner.tables):
        print(f"{src.name}: {len(table)} samples, {len(table.reasons)} bad, "
              f"{int(table.text.sum() + table.images.sum() * cfg.model.image_tokens)} tokens, "
              f"{int(table.images.sum())} images")
    print(f"sizes indexed in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
