"""Look inside webdataset shards: counts, token lengths, images per sample, and a PNG grid of samples.

    python -m data_tools inspect SHARDS... [--tokenizer tokenizer.json] [--image-tokens 576]
                                           [--grid out.png] [--n 8] [--cols 4] [--limit N] [--json]
    python -m data_tools inspect --config CFG --sample SOURCE:INDEX [--set KEY=VALUE ...] [--json]

The second form shows one sample of a training config's source, as the planner numbers them (the ``source`` and
``index`` of a line of ``<run_dir>/bad_steps.jsonl``, or an entry of ``data.skip_samples``): where it lives (file or
shard and key), its planned size, its text and its images.

SHARDS are shard files, directories (their *.tar) or globs. Token length = the input positions a sample needs
(``len(SampleEncoder.encode(record).tokens)``: BOS, text, ``image_tokens`` per image, EOS, minus the last id which
is only a target), i.e. it fits without truncation when ``seq_len`` is at least this.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from vlpretrain.data.shard_index import ShardError
from vlpretrain.data.shards import IMAGE_PLACEHOLDER, BadSample, ShardReader

DEFAULT_IMAGE_TOKENS = 576
THUMB = 192  # grid cell width and thumbnail box height, pixels
TEXT_HEIGHT = 112  # text area below each thumbnail, pixels
MAX_BAD_EXAMPLES = 5


def _lengths_summary(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    s = sorted(values)

    def pct(q: float) -> int:  # nearest rank
        return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]

    return {"count": len(s), "min": s[0], "mean": round(sum(s) / len(s), 1), "p50": pct(50), "p95": pct(95),
            "max": s[-1]}


def inspect_shards(paths: str | os.PathLike | Iterable[str | os.PathLike], tokenizer: str | os.PathLike | None = None,
                   image_tokens: int = DEFAULT_IMAGE_TOKENS, limit: int | None = None,
                   reader: ShardReader | None = None) -> dict:
    """Statistics of the samples in ``paths`` (the first ``limit`` samples when given)."""
    reader = reader or ShardReader(paths)
    encoder = None
    if tokenizer is not None:
        from vlpretrain.data.encoding import SampleEncoder
        from vlpretrain.data.tokenizer import TextTokenizer

        encoder = SampleEncoder(TextTokenizer(tokenizer), image_tokens=image_tokens, seq_len=1 << 40)
    n = len(reader) if limit is None else min(limit, len(reader))
    categories, sources, images_hist = Counter(), Counter(), Counter()
    bad, bad_examples, unencodable = 0, [], Counter()
    lengths: list[int] = []
    lengths_by_cat: dict[str, list[int]] = {}
    image_bytes = 0
    for i in range(n):
        try:
            rec = reader.read(i)
        except BadSample as e:
            bad += 1
            if len(bad_examples) < MAX_BAD_EXAMPLES:
                bad_examples.append(str(e))
            continue
        cat, src = str(rec.get("category", "?")), str(rec.get("source", "?"))
        categories[cat] += 1
        sources[src] += 1
        images_hist[len(rec["images"])] += 1
        image_bytes += sum(len(b) for b in rec["images"])
        if encoder is not None:
            try:
                enc = encoder.encode({**rec, "images": rec.get("image_names", [])})
            except ValueError as e:
                unencodable[str(e)] += 1
                continue
            lengths.append(len(enc.tokens))
            lengths_by_cat.setdefault(cat, []).append(len(enc.tokens))
    stats = {
        "shards": [str(p) for p in reader.paths],
        "shard_problems": reader.problems,
        "samples": n,
        "readable": n - bad,
        "unreadable": bad,
        "unreadable_examples": bad_examples,
        "categories": dict(sorted(categories.items())),
        "sources": dict(sorted(sources.items())),
        "images_per_sample": {str(k): v for k, v in sorted(images_hist.items())},
        "image_bytes": image_bytes,
    }
    if encoder is not None:
        stats["image_tokens"] = image_tokens
        stats["token_length"] = _lengths_summary(lengths)
        stats["token_length_by_category"] = {c: _lengths_summary(v) for c, v in sorted(lengths_by_cat.items())}
        stats["unencodable"] = dict(sorted(unencodable.items()))
    return stats


def format_stats(stats: dict) -> str:
    """The statistics as readable plain-text tables."""
    out = [f"shards: {len(stats['shards'])}   samples: {stats['samples']}   readable: {stats['readable']}   "
           f"unreadable: {stats['unreadable']}   image data: {stats['image_bytes'] / 1e6:.2f} MB"]
    for path, problem in stats["shard_problems"].items():
        out.append(f"  damaged shard {path}: {problem}")
    for example in stats["unreadable_examples"]:
        out.append(f"  unreadable: {example}")
    total = max(1, stats["readable"])

    def table(title: str, counts: dict) -> None:
        if not counts:
            return
        width = max(len(title), *(len(str(k)) for k in counts))
        out.append("")
        out.append(f"{title:<{width}}  {'samples':>8}  {'share':>6}")
        for k, v in counts.items():
            out.append(f"{k:<{width}}  {v:>8}  {100 * v / total:>5.1f}%")

    table("category", stats["categories"])
    table("source", stats["sources"])
    table("images/sample", stats["images_per_sample"])
    if "token_length" in stats:
        out.append("")
        out.append(f"token length (image_tokens={stats['image_tokens']})")
        rows = {"all": stats["token_length"], **stats["token_length_by_category"]}
        width = max(8, *(len(k) for k in rows))
        out.append(f"{'':<{width}}  {'count':>7}  {'min':>6}  {'mean':>8}  {'p50':>6}  {'p95':>6}  {'max':>6}")
        for name, s in rows.items():
            if s["count"]:
                out.append(f"{name:<{width}}  {s['count']:>7}  {s['min']:>6}  {s['mean']:>8.1f}  {s['p50']:>6}  "
                           f"{s['p95']:>6}  {s['max']:>6}")
        for reason, count in stats["unencodable"].items():
            out.append(f"  not encodable ({count}): {reason}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- grid


def grid_size(n_cells: int, cols: int = 4, thumb: int = THUMB, text_height: int = TEXT_HEIGHT) -> tuple[int, int]:
    """(width, height) of the grid image for ``n_cells`` samples."""
    cols = max(1, min(cols, n_cells))
    rows = max(1, math.ceil(n_cells / cols))
    return cols * thumb, rows * (thumb + text_height)


def _sample_text(rec: dict) -> str:
    if "conversation" in rec:
        text = "\n".join(f"{t.get('role', '?')}: {t.get('content', '')}" for t in rec["conversation"] or [])
    else:
        text = str(rec.get("text") or "")
    return text.replace(IMAGE_PLACEHOLDER, "<img>")


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap by pixel width; the last kept line ends with '...' when text is cut."""
    lines: list[str] = []
    for para in text.split("\n"):
        words = para.split()
        line = ""
        for word in words:
            while draw.textlength(word, font=font) > width and len(word) > 1:  # a huge word: hard split
                cut = max(1, int(len(word) * width / draw.textlength(word, font=font)) - 1)
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:cut])
                word = word[cut:]
            trial = f"{line} {word}" if line else word
            if draw.textlength(trial, font=font) <= width:
                line = trial
            else:
                lines.append(line)
                line = word
        lines.append(line)
        if len(lines) > max_lines:
            break
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def render_grid(reader: ShardReader, out_path: str | os.PathLike, n: int = 8, cols: int = 4,
                thumb: int = THUMB, text_height: int = TEXT_HEIGHT) -> tuple[int, int]:
    """Write a PNG grid of ``n`` samples spread evenly over ``reader`` (first image + wrapped text per cell).

    Returns the image size, which is ``grid_size(min(n, len(reader)), cols, thumb, text_height)``.
    """
    from PIL import Image, ImageDraw, ImageFont

    total = len(reader)
    n = max(0, min(n, total))
    if n == 0:
        raise ValueError("no samples to render")
    indices = sorted({round(k * (total - 1) / max(1, n - 1)) for k in range(n)}) if n > 1 else [0]
    width, height = grid_size(len(indices), cols, thumb, text_height)
    cols = max(1, min(cols, len(indices)))
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    bitmap = not isinstance(font, ImageFont.FreeTypeFont)
    line_h = int(draw.textbbox((0, 0), "Ag", font=font)[3]) + 2
    pad = 4
    for cell, i in enumerate(indices):
        x0, y0 = (cell % cols) * thumb, (cell // cols) * (thumb + text_height)
        box = thumb - 2 * pad
        try:
            rec = reader.read(i)
            header = f"[{rec.get('category', '?')}] {rec['__key__']}"
            if len(rec["images"]) > 1:
                header += f" (+{len(rec['images']) - 1} img)"
            body = _sample_text(rec)
            image = None
            if rec["images"]:
                try:
                    with Image.open(io.BytesIO(rec["images"][0])) as im:
                        image = im.convert("RGB")
                except Exception:
                    body = "(undecodable image) " + body
        except BadSample as e:
            path, key = reader.locate(i)
            header, body, image = f"[unreadable] {key}", e.reason, None
        if image is not None:
            scale = min(box / image.width, box / image.height)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
            canvas.paste(image, (x0 + pad + (box - size[0]) // 2, y0 + pad + (box - size[1]) // 2))
        else:
            draw.rectangle((x0 + pad, y0 + pad, x0 + pad + box - 1, y0 + pad + box - 1), fill=(235, 235, 235))
            draw.text((x0 + 2 * pad, y0 + box // 2), "(no image)", fill=(120, 120, 120), font=font)
        draw.rectangle((x0, y0, x0 + thumb - 1, y0 + thumb + text_height - 1), outline=(200, 200, 200))
        text = f"{header}\n{body}"
        if bitmap:  # the bitmap font only has latin-1 glyphs
            text = text.encode("latin-1", "replace").decode("latin-1")
        lines = _wrap(draw, text, font, thumb - 2 * pad, max(1, (text_height - pad) // line_h))
        for j, line in enumerate(lines):
            draw.text((x0 + pad, y0 + thumb + j * line_h), line, fill=(0, 0, 0) if j else (30, 60, 160), font=font)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, out_path)
    return canvas.size


# ----------------------------------------------------------------------------- command line


def add_inspect_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("inspect", help="counts, token lengths and a sample grid of webdataset shards")
    p.add_argument("shards", nargs="*", help="shard files, directories or globs")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json: adds token length statistics")
    p.add_argument("--image-tokens", type=int, default=DEFAULT_IMAGE_TOKENS, help="tokens per image")
    p.add_argument("--grid", default=None, help="write a PNG grid of samples here")
    p.add_argument("--n", type=int, default=8, help="samples in the grid")
    p.add_argument("--cols", type=int, default=4, help="grid columns")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples for the statistics")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--config", default=None, help="with --sample: the training config whose sources are meant")
    p.add_argument("--set", nargs="*", default=[], help="with --config: overrides KEY=VALUE, as for training")
    p.add_argument("--sample", default=None, help="SOURCE:INDEX: show this sample of the config's source")


def sample_view(cfg, spec: str) -> dict:
    """Sample ``spec`` ("<source name>:<sample index>", the planner's numbering) of ``cfg``'s sources: where it
    lives and its planned size (``StepPlanner.describe``), its text and its images."""
    from vlpretrain.data.loader import StepPlanner, resolve
    from vlpretrain.data.tokenizer import TextTokenizer
    from vlpretrain.errors import UserError

    name, sep, index = spec.rpartition(":")
    if not sep or not index.isdigit():
        raise UserError(f"--sample: '{spec}' is not SOURCE:INDEX")
    tok = TextTokenizer(resolve(cfg.data.root, cfg.data.tokenizer))
    planner = StepPlanner(cfg, tok)
    names = [s.name for s in planner.sources]
    if name not in names:
        raise UserError(f"--sample: no source named '{name}' (sources: {', '.join(names)})")
    i, n = names.index(name), int(index)
    src = planner.sources[i]
    if n >= len(src):
        raise UserError(f"--sample: source '{name}' has {len(src)} samples, no sample {n}")
    out = planner.describe(i, n)
    ids = src.tokens(n)
    if ids is not None:
        out["text"] = tok.decode(ids.tolist())
        return out
    try:
        rec = src.record(n)
    except (BadSample, KeyError, OSError) as e:
        out["unreadable"] = str(e)
        return out
    out["text"] = rec["text"] if "text" in rec else rec.get("conversation")
    root = getattr(src, "image_root", None) or getattr(src, "root", None)
    where = f"{out['shard']}:{out['member_key']}." if "shard" in out else ""
    out["image_files"] = [str(Path(root) / str(x)) if root else f"{where}{str(x).lower()}" for x in rec["images"]]
    return out


def _run_sample(args: argparse.Namespace) -> int:
    from vlpretrain.config import load_config

    if not args.config:
        print("error: --sample needs --config (the training config whose sources are meant)", file=sys.stderr)
        return 2
    view = sample_view(load_config(args.config, args.set), args.sample)
    if args.json:
        print(json.dumps(view, indent=2, ensure_ascii=False))
        return 0
    for k, v in view.items():
        if k == "text" and not isinstance(v, str):
            v = json.dumps(v, ensure_ascii=False, indent=1)
        print(f"{k}: {v}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    if args.sample:
        return _run_sample(args)
    if not args.shards:
        print("error: inspect needs SHARDS, or --config CFG --sample SOURCE:INDEX", file=sys.stderr)
        return 2
    try:
        reader = ShardReader(args.shards)
    except (FileNotFoundError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stats = inspect_shards(args.shards, tokenizer=args.tokenizer, image_tokens=args.image_tokens,
                           limit=args.limit, reader=reader)
    if args.grid:
        size = render_grid(reader, args.grid, n=args.n, cols=args.cols)
        stats["grid"] = {"path": args.grid, "width": size[0], "height": size[1]}
    if args.json:
        json.dump(stats, sys.stdout, indent=2, ensure_ascii=False)
        print()
    else:
        print(format_stats(stats))
        if args.grid:
            print(f"\ngrid: {args.grid} ({stats['grid']['width']}x{stats['grid']['height']})")
    return 0
