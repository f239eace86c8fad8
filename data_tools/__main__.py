"""Command line: `python -m data_tools demo ...` and `python -m data_tools tokenizer ...`."""

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


if __name__ == "__main__":
    sys.exit(main())
