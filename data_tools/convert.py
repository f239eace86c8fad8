"""Converters from common dataset layouts to vlpretrain's webdataset shards (see vlpretrain/data/shards.py).

    python -m data_tools convert llava    LLAVA.json IMAGE_ROOT --out DIR [--prefix llava]
    python -m data_tools convert jsonl    FILE.jsonl --out DIR [--root DIR] [--category text]
    python -m data_tools convert captions IMAGE_DIR --out DIR [--captions captions.csv|.jsonl]
    python -m data_tools convert demo     DEMO_DIR --out DIR [--include-text]

Common options: --max-samples-per-shard, --max-bytes, --overwrite, --no-verify. Every converter is deterministic
(input order, fixed tar metadata), skips bad inputs with a counted reason and prints a summary. Sample keys are
the input position (``00000012``); the input's own id, when it has one, is kept in the record as "id".

Plain text corpora are better tokenized into Megatron-style .bin/.idx files; the jsonl converter is meant for
small text or SFT sets and for JSONL files in vlpretrain's own sample format (the demo data).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vlpretrain.data.shards import (
    DEFAULT_MAX_BYTES,
    IMAGE_EXTENSIONS,
    IMAGE_PLACEHOLDER,
    ShardWriter,
    count_placeholders,
)

LLAVA_ROLES = {"human": "User", "user": "User", "gpt": "Assistant", "assistant": "Assistant"}
LLAVA_IMAGE = "<image>"
DEMO_FILES = ("captions", "ocr", "interleaved", "sft")
DEMO_MANIFEST = "shards_manifest.json"


@dataclass
class ConvertReport:
    """What one conversion did."""

    name: str
    out_dir: Path
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    categories: Counter = field(default_factory=Counter)
    shards: list[Path] = field(default_factory=list)
    shard_bytes: int = 0

    def summary(self) -> str:
        lines = [f"{self.name}: wrote {self.written} samples to {len(self.shards)} shard(s) in {self.out_dir} "
                 f"({self.shard_bytes / 1e6:.2f} MB)"]
        if self.categories:
            lines.append("  categories: " + ", ".join(f"{k} {v}" for k, v in sorted(self.categories.items())))
        total = sum(self.skipped.values())
        if total:
            lines.append(f"  skipped {total}: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        else:
            lines.append("  skipped 0")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"name": self.name, "written": self.written, "skipped": dict(sorted(self.skipped.items())),
                "categories": dict(sorted(self.categories.items())),
                "shards": [p.name for p in self.shards], "shard_bytes": self.shard_bytes}


class _Sink:
    """A ShardWriter plus the report and the per-image checks shared by every converter."""

    def __init__(self, name: str, out_dir: str | os.PathLike, prefix: str, source: str, verify: bool,
                 max_samples_per_shard: int, max_bytes: int, overwrite: bool):
        self.report = ConvertReport(name, Path(out_dir))
        self.source = source
        self.verify = verify
        self.writer = ShardWriter(out_dir, prefix, max_samples_per_shard=max_samples_per_shard,
                                  max_bytes=max_bytes, source=source, overwrite=overwrite)

    def skip(self, reason: str) -> None:
        self.report.skipped[reason] += 1

    def image_problem(self, path: Path) -> str | None:
        if not path.is_file():
            return "missing image"
        if self.verify:
            from PIL import Image

            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception:
                return "corrupt image"
        return None

    def add(self, key: str, record: dict, images: list[Path]) -> bool:
        """Check the images, write the sample; False (and counted) when skipped."""
        for path in images:
            problem = self.image_problem(path)
            if problem:
                self.skip(problem)
                return False
        record.setdefault("source", self.source)
        try:
            self.writer.write(key, record, images)
        except (ValueError, OSError) as e:
            if self.writer.closed:  # failed while writing: not a sample problem
                raise
            self.skip(f"invalid sample ({type(e).__name__})")
            return False
        self.report.written += 1
        self.report.categories[record["category"]] += 1
        return True

    def close(self) -> ConvertReport:
        self.report.shards = self.writer.close()
        self.report.shard_bytes = sum(p.stat().st_size for p in self.report.shards)
        return self.report

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.writer.abort()


def _key(i: int) -> str:
    return f"{i:08d}"


def _safe_prefix(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]+", "_", name).strip("_") or "shard"


def _read_json_or_jsonl(path: Path, report_skip) -> Iterator[object]:
    """Items of a JSON list or of a JSONL file (one value per line; unparsable lines are skipped and counted)."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        data = json.loads(text)
        yield from data
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError:
            report_skip("bad json")


def _sink_kwargs(kwargs: dict) -> dict:
    return {"verify": kwargs.get("verify", True),
            "max_samples_per_shard": kwargs.get("max_samples_per_shard", 1000),
            "max_bytes": kwargs.get("max_bytes", DEFAULT_MAX_BYTES),
            "overwrite": kwargs.get("overwrite", False)}


# ----------------------------------------------------------------------------- LLaVA


def convert_llava(json_path: str | os.PathLike, image_root: str | os.PathLike, out_dir: str | os.PathLike,
                  prefix: str = "llava", source: str | None = None, **kwargs) -> ConvertReport:
    """LLaVA-style instruction data -> "sft" samples.

    Input: a JSON list (or JSONL) of {"id", "image": "rel/path.jpg" (or a list, or absent),
    "conversations": [{"from": "human"|"gpt", "value": "<image>\\nWhat ..."}]}; images relative to image_root.
    Roles map human->User, gpt->Assistant; "<image>" becomes "<image_placeholder>". A sample with images but no
    "<image>" mark gets the placeholders at the start of its first user turn (LLaVA's convention).
    """
    json_path, image_root = Path(json_path), Path(image_root)
    source = source or _safe_prefix(json_path.stem)
    with _Sink("llava", out_dir, prefix, source, **_sink_kwargs(kwargs)) as sink:
        for i, item in enumerate(_read_json_or_jsonl(json_path, sink.skip)):
            if not isinstance(item, dict):
                sink.skip("not an object")
                continue
            turns_in = item.get("conversations")
            if not isinstance(turns_in, list) or not turns_in:
                sink.skip("no conversation")
                continue
            turns, bad_role = [], False
            for turn in turns_in:
                role = LLAVA_ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
                if role is None:
                    bad_role = True
                    break
                content = str(turn.get("value", "")).replace(LLAVA_IMAGE, IMAGE_PLACEHOLDER)
                turns.append({"role": role, "content": content})
            if bad_role:
                sink.skip("unknown role")
                continue
            if not any(t["role"] == "Assistant" for t in turns):
                sink.skip("no assistant turn")
                continue
            image = item.get("image")
            rels = [] if image in (None, "", []) else [image] if isinstance(image, str) else list(image)
            record: dict = {"conversation": turns, "category": "sft", "source": source}
            n = count_placeholders(record)
            if n == 0 and rels:
                first_user = next((t for t in turns if t["role"] == "User"), None)
                if first_user is None:
                    sink.skip("image placeholder mismatch")
                    continue
                first_user["content"] = IMAGE_PLACEHOLDER * len(rels) + "\n" + first_user["content"]
            elif n != len(rels):
                sink.skip("image placeholder mismatch")
                continue
            if "id" in item:
                record["id"] = str(item["id"])
            sink.add(_key(i), record, [image_root / str(r) for r in rels])
        report = sink.close()
    return report


# ----------------------------------------------------------------------------- JSONL (vlpretrain sample format)


def convert_jsonl(jsonl_path: str | os.PathLike, out_dir: str | os.PathLike, prefix: str | None = None,
                  root: str | os.PathLike | None = None, category: str = "text", source: str | None = None,
                  **kwargs) -> ConvertReport:
    """JSONL records in vlpretrain's sample format -> shards.

    Each line: {"text": ...} or {"conversation": [...]}, optional "images" (paths relative to ``root``, default the
    file's directory, one per placeholder), optional "category" or "kind" (else ``category``), "source", "id" and
    other fields (kept). Plain ``{"text": ...}`` lines become text samples.
    """
    jsonl_path = Path(jsonl_path)
    root = Path(root) if root is not None else jsonl_path.parent
    prefix = prefix or _safe_prefix(jsonl_path.stem)
    source = source or prefix
    with _Sink("jsonl", out_dir, prefix, source, **_sink_kwargs(kwargs)) as sink:
        with open(jsonl_path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError:
                    sink.skip("bad json")
                    continue
                if not isinstance(item, dict):
                    sink.skip("not an object")
                    continue
                record = {k: v for k, v in item.items() if k not in ("images", "kind")}
                record["category"] = str(item.get("category") or item.get("kind") or category)
                if "conversation" in item:
                    turns = item["conversation"]
                    if not isinstance(turns, list) or not any(
                            isinstance(t, dict) and t.get("role") == "Assistant" for t in turns):
                        sink.skip("no assistant turn")
                        continue
                else:
                    text = item.get("text")
                    if not isinstance(text, str) or not text.replace(IMAGE_PLACEHOLDER, "").strip():
                        sink.skip("no text")
                        continue
                images = item.get("images") or []
                if not isinstance(images, list) or count_placeholders(record) != len(images):
                    sink.skip("image placeholder mismatch")
                    continue
                sink.add(_key(i), record, [root / str(p) for p in images])
        report = sink.close()
    return report


# ----------------------------------------------------------------------------- image folder + captions


def _load_caption_map(path: Path) -> dict[str, str]:
    """file name (relative path or base name) -> caption, from a CSV (columns file|image|filename|path and
    caption|text) or a JSON/JSONL mapping ({"file": ..., "caption": ...} rows, or one {name: caption} object)."""
    name_cols, text_cols = ("file", "image", "filename", "file_name", "path"), ("caption", "text")

    def pick(row: dict, cols: tuple[str, ...]) -> str | None:
        for c in cols:
            if row.get(c) not in (None, ""):
                return str(row[c])
        return None

    rows: list[dict] = []
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        text = path.read_text(encoding="utf-8")
        stripped = text.lstrip()
        if stripped.startswith("{") and "\n{" not in stripped.rstrip():
            data = json.loads(text)
            if all(isinstance(v, str) for v in data.values()):
                return {str(k): v for k, v in data.items()}
            rows = [data]
        elif stripped.startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    mapping: dict[str, str] = {}
    for row in rows:
        if isinstance(row, dict):
            name, caption = pick(row, name_cols), pick(row, text_cols)
            if name is not None:
                mapping[name] = caption if caption is not None else ""
    return mapping


def convert_captions(image_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     captions: str | os.PathLike | None = None, prefix: str = "caption",
                     source: str | None = None, **kwargs) -> ConvertReport:
    """An image folder with captions -> "caption" samples (text = placeholder + caption).

    Captions come from ``image.txt`` next to ``image.jpg``, or from a mapping file (``captions``: CSV or JSONL,
    keyed by the image's path relative to image_dir or its base name). Images are taken in sorted relative-path
    order; mapping entries whose image is not in the folder are counted as "missing image".
    """
    image_dir = Path(image_dir)
    source = source or _safe_prefix(image_dir.name)
    mapping = _load_caption_map(Path(captions)) if captions is not None else None
    files = sorted((p for p in image_dir.rglob("*") if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS),
                   key=lambda p: p.relative_to(image_dir).as_posix())
    used: set[str] = set()
    with _Sink("captions", out_dir, prefix, source, **_sink_kwargs(kwargs)) as sink:
        for i, path in enumerate(files):
            rel = path.relative_to(image_dir).as_posix()
            if mapping is not None:
                name = rel if rel in mapping else path.name if path.name in mapping else None
                caption = mapping[name] if name is not None else None
                if name is not None:
                    used.add(name)
            else:
                txt = path.with_suffix(".txt")
                caption = txt.read_text(encoding="utf-8") if txt.is_file() else None
            if caption is None:
                sink.skip("no caption")
                continue
            caption = caption.strip()
            if not caption:
                sink.skip("empty caption")
                continue
            if IMAGE_PLACEHOLDER in caption:
                sink.skip("image placeholder in caption")
                continue
            sink.add(_key(i), {"text": IMAGE_PLACEHOLDER + caption, "category": "caption", "source": source,
                               "id": rel}, [path])
        if mapping is not None:
            for name in mapping:
                if name not in used:
                    sink.skip("missing image")
        report = sink.close()
    return report


# ----------------------------------------------------------------------------- demo dataset


def convert_demo(demo_dir: str | os.PathLike, out_dir: str | os.PathLike, include_text: bool = False,
                 verbose: bool = True, **kwargs) -> dict[str, ConvertReport]:
    """The demo dataset's training JSONL files (captions, ocr, interleaved, sft; text with ``include_text``) ->
    one shard set per file, prefix = file stem (``captions-000000.tar``, ...), source = file stem. Writes
    ``out_dir/shards_manifest.json`` last: {name: {"shards": [...], "samples": n, "skipped": {...}}}."""
    demo_dir, out_dir = Path(demo_dir), Path(out_dir)
    names = DEMO_FILES + (("text",) if include_text else ())
    missing = [n for n in names if not (demo_dir / f"{n}.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(f"{demo_dir} is not a demo dataset: missing {', '.join(m + '.jsonl' for m in missing)}")
    reports: dict[str, ConvertReport] = {}
    for name in names:
        report = convert_jsonl(demo_dir / f"{name}.jsonl", out_dir, prefix=name, root=demo_dir, source=name,
                               category=name, **kwargs)
        report.name = f"demo/{name}"
        reports[name] = report
        if verbose:
            print(report.summary(), flush=True)
    manifest = {name: {"shards": [p.name for p in r.shards], "samples": r.written,
                       "skipped": dict(sorted(r.skipped.items())), "categories": dict(sorted(r.categories.items()))}
                for name, r in reports.items()}
    tmp = out_dir / f".{DEMO_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / DEMO_MANIFEST)
    return reports


# ----------------------------------------------------------------------------- command line


def add_convert_parser(commands: argparse._SubParsersAction) -> None:
    conv = commands.add_parser("convert", help="convert a dataset to webdataset shards (llava, jsonl, captions, demo)")
    kinds = conv.add_subparsers(dest="format", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="output directory for the shards")
        p.add_argument("--max-samples-per-shard", type=int, default=1000)
        p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="shard size limit in bytes")
        p.add_argument("--overwrite", action="store_true", help="replace shards with the same prefix in --out")
        p.add_argument("--no-verify", dest="verify", action="store_false",
                       help="do not check that every image opens (PIL verify)")

    p = kinds.add_parser("llava", help="LLaVA-style JSON + image folder -> sft samples")
    p.add_argument("json", help="LLaVA JSON list (or JSONL)")
    p.add_argument("images", help="image root the 'image' paths are relative to")
    p.add_argument("--prefix", default="llava")
    p.add_argument("--source", default=None, help="source name (default: the JSON file's stem)")
    common(p)

    p = kinds.add_parser("jsonl", help="JSONL of {'text'} / {'conversation'} (+ 'images') -> samples")
    p.add_argument("input", help="the JSONL file")
    p.add_argument("--root", default=None, help="directory image paths are relative to (default: the file's)")
    p.add_argument("--category", default="text", help="category for records without 'category'/'kind'")
    p.add_argument("--prefix", default=None, help="shard prefix (default: the file's stem)")
    p.add_argument("--source", default=None)
    common(p)

    p = kinds.add_parser("captions", help="image folder + captions (x.txt beside x.jpg, or a mapping file)")
    p.add_argument("images", help="the image folder (searched recursively)")
    p.add_argument("--captions", default=None, help="CSV or JSONL mapping file name -> caption")
    p.add_argument("--prefix", default="caption")
    p.add_argument("--source", default=None)
    common(p)

    p = kinds.add_parser("demo", help="the demo dataset's JSONL files -> one shard set per file")
    p.add_argument("data", help="a directory written by `python -m data_tools demo`")
    p.add_argument("--include-text", action="store_true", help="also convert text.jsonl")
    common(p)


def run_convert(args: argparse.Namespace) -> int:
    try:
        return _run_convert(args)
    except (FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run_convert(args: argparse.Namespace) -> int:
    opts = {"verify": args.verify, "max_samples_per_shard": args.max_samples_per_shard,
            "max_bytes": args.max_bytes, "overwrite": args.overwrite}
    if args.format == "demo":
        reports = convert_demo(args.data, args.out, include_text=args.include_text, **opts)
        total = sum(r.written for r in reports.values())
        skipped = sum(sum(r.skipped.values()) for r in reports.values())
        print(f"demo: {total} samples written, {skipped} skipped; manifest {Path(args.out) / DEMO_MANIFEST}")
        return 0
    if args.format == "llava":
        report = convert_llava(args.json, args.images, args.out, prefix=args.prefix, source=args.source, **opts)
    elif args.format == "jsonl":
        report = convert_jsonl(args.input, args.out, prefix=args.prefix, root=args.root, category=args.category,
                               source=args.source, **opts)
    else:
        report = convert_captions(args.images, args.out, captions=args.captions, prefix=args.prefix,
                                  source=args.source, **opts)
    print(report.summary())
    return 0
