"""Deterministic demo dataset for vision-language pretraining (nothing is downloaded).

Images are synthetic 128x128 RGB PNGs (shapes, two shapes, OCR words, bar charts);
text comes from the Python documentation that ships with Python (pydoc_data).
Every random choice comes from a numpy Generator seeded from (seed, stream name),
so the same seed always gives byte-identical files, and the held-out eval images
come from their own stream and are never used by a training file.

This module writes the dataset; what goes into it comes from ``demo_images`` (the pictures),
``demo_texts`` (captions, questions, chats) and ``demo_corpus`` (the pydoc text).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from vlpretrain.files import write_text_atomic

from .demo_corpus import text_chat_sources, text_chunks, word_list
from .demo_images import BAR_NAMES, COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, Meta, make_image, pick
from .demo_texts import (
    NUMBER_WORDS,
    QUESTIONS,
    answer_text,
    describe,
    fix_articles,
    image_caption,
    image_conversation,
    text_conversation,
)
from .tokenizer import (
    DEFAULT_VOCAB_SIZE,
    IMAGE_PLACEHOLDER,
    SPECIAL_TOKEN_IDS,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    iter_training_texts,
    train_tokenizer,
)

HELD_OUT_EVERY = 20  # text chunks: one in 20 is the held-out language eval set

# Samples per file at scale 1.0 (text.jsonl: all chunks at scale >= 1).
BASE_COUNTS = {"captions.jsonl": 3000, "ocr.jsonl": 800, "interleaved.jsonl": 800, "sft.jsonl": 6000,
               "eval_mc.jsonl": 200}
# Training images at scale 1.0; they are shared by the training files to keep the output small. Shape and
# chart questions need many distinct images: with 400 charts and ~140 tallest-bar answers the tiny model did
# not even fit its training charts (issue 16).
POOL_SIZES = {"shape": 2400, "two_shapes": 400, "ocr": 800, "chart": 1600}
# Image kinds of the sft conversations: shape and chart questions are the hard ones, so they get the most.
# No two-shape images: "What shape is in the top left corner?" -> "Circle." shares the answer form of the
# one-shape question but depends on image and question jointly (as "shortest bar" did, see demo_texts._qa_pairs); with
# them (0.1) and 10% text chats, shape / tallest bar ended stage 3 at 0.52 / 0.62, without them and with 5%
# text chats at 0.66 / 0.92 from the same stage-2 weights (issue 16). Two-shape images stay in the captions
# and interleaved documents.
SFT_IMAGE_MIX = {"shape": 0.5, "ocr": 0.1, "chart": 0.4}
# Text-only chats have answers ~5x longer than the image answers, so at 0.3 they took most of stage 3's
# supervised tokens; at 0.1 shape / tallest bar came out 0.44 / 0.56 instead of 0.34 / 0.34 (issue 16).
SFT_TEXT_FRACTION = 0.05

Pool = list[tuple[str, Meta]]  # (image path relative to the output dir, metadata)


def _rng(seed: int, stream: str) -> np.random.Generator:
    """An independent generator per stream, so changing one file's count never changes another."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode())])


def _count(base: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, int(round(base * scale)))


# ----------------------------------------------------------------------------- writing


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _save_png(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _make_pool(out: Path, kind: str, n: int, rng: np.random.Generator, words: list[str]) -> Pool:
    pool = []
    for i in range(n):
        image, meta = make_image(kind, rng, words)
        rel = f"images/{kind}_{i:05d}.png"
        _save_png(image, out / rel)
        pool.append((rel, meta))
    return pool


def _choose(rng: np.random.Generator, pools: dict[str, Pool], weights: dict[str, float]) -> tuple[str, Meta]:
    kinds = list(weights)
    p = np.array([weights[k] for k in kinds], dtype=float)
    kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
    return pick(rng, pools[kind])


def _interleaved_doc(rng: np.random.Generator, pools: dict[str, Pool]) -> tuple[list[str], str]:
    n = int(rng.integers(2, 4))
    picked: Pool = []
    while len(picked) < n:
        item = _choose(rng, pools, {"shape": 0.5, "two_shapes": 0.2, "ocr": 0.15, "chart": 0.15})
        if item[0] not in (p[0] for p in picked):
            picked.append(item)
    ph = IMAGE_PLACEHOLDER
    parts = [pick(rng, ("Here is a picture.", "Let us look at some pictures.", "This page has a few images.",
                         "Below are several images.")), f"{ph} It shows {describe(picked[0][1])}."]
    for i, (_, meta) in enumerate(picked[1:], start=1):
        link = "Finally," if i == n - 1 and n > 2 else pick(rng, ("Next,", "Then,", "After that,"))
        parts.append(f"{link} {ph} {pick(rng, ('shows', 'contains', 'has'))} {describe(meta)}.")
    a, b = picked[0][1], picked[1][1]
    if a["kind"] == b["kind"] == "shape":
        oa, ob = a["objects"][0], b["objects"][0]
        if oa["colour"] == ob["colour"]:
            parts.append(f"The first two shapes are both {oa['colour']}.")
        elif oa["shape"] == ob["shape"]:
            parts.append(f"The first two pictures both show a {oa['shape']}.")
        else:
            parts.append(f"The first shape is {oa['colour']} and the second is {ob['colour']}.")
    parts.append(f"In total there {'are' if rng.random() < 0.5 else 'were'} {NUMBER_WORDS[n]} pictures.")
    return [p for p, _ in picked], fix_articles(" ".join(parts))


def _eval_set(out: Path, n: int, rng: np.random.Generator, words: list[str]) -> list[dict]:
    """Held-out multiple choice questions on fresh images, with balanced answer indices and question types
    (as many of each type: the per-type accuracy is the point of the demo)."""
    answer_slots = rng.permutation(np.arange(n) % 4)
    types = rng.permutation(np.array(["colour", "shape", "position", "tallest_bar"])[np.arange(n) % 4])
    choices = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS),
               "tallest_bar": list(BAR_NAMES)}
    rows = []
    for i in range(n):
        qtype = str(types[i])
        if qtype == "tallest_bar":
            image, meta = make_image("chart", rng, words, n_bars=4)  # four bars: every option is a real bar
            correct = meta["tallest"]
        else:
            image, meta = make_image("shape", rng, words)
            correct = meta["objects"][0][qtype]
        rel = f"images/eval_{i:05d}.png"
        _save_png(image, out / rel)
        others = [c for c in choices[qtype] if c != correct]
        options = [others[int(k)] for k in rng.choice(len(others), 3, replace=False)]
        answer = int(answer_slots[i])
        options.insert(answer, correct)
        rows.append({"id": f"eval-{i:05d}", "images": [rel],
                     "question": f"{IMAGE_PLACEHOLDER}\n{QUESTIONS[qtype][0]}",
                     "options": [answer_text(qtype, o) for o in options], "answer": answer, "type": qtype})
    return rows


def _report(label: str, count: int, unit: str, n_bytes: int, t0: float) -> None:
    seconds = time.perf_counter() - t0
    print(f"  {label:<18} {count:>6} {unit:<8} {n_bytes / 1e6:7.2f} MB  ({seconds:.1f}s)", flush=True)


def _write_images(out: Path, seed: int, scale: float, words: list[str], verbose: bool,
                  t0: float) -> tuple[dict[str, Pool], list[dict], set[str]]:
    """The training image pools and the held-out eval set (its rows too); PNGs of an earlier, larger run that this
    one did not write are removed. Returns (pools, eval rows, every image path written)."""
    pools = {kind: _make_pool(out, kind, _count(n, scale, 4), _rng(seed, f"images/{kind}"), words)
             for kind, n in POOL_SIZES.items()}
    eval_rows = _eval_set(out, _count(BASE_COUNTS["eval_mc.jsonl"], scale, 4), _rng(seed, "eval"), words)
    written = {rel for pool in pools.values() for rel, _ in pool} | {r["images"][0] for r in eval_rows}
    for stale in (out / "images").glob("*.png"):  # left over from an earlier, larger run
        if f"images/{stale.name}" not in written:
            stale.unlink()
    if verbose:
        _report("images/", len(written), "PNGs", sum((out / rel).stat().st_size for rel in written), t0)
    return pools, eval_rows, written


def _image_text_files(pools: dict[str, Pool], seed: int, scale: float) -> dict[str, list[dict]]:
    """captions.jsonl, ocr.jsonl and interleaved.jsonl (each from its own random stream)."""
    files: dict[str, list[dict]] = {"captions.jsonl": [], "ocr.jsonl": [], "interleaved.jsonl": []}
    rng = _rng(seed, "captions")
    for i in range(_count(BASE_COUNTS["captions.jsonl"], scale)):
        rel, meta = _choose(rng, pools, {"shape": 0.7, "two_shapes": 0.15, "chart": 0.15})
        files["captions.jsonl"].append({"id": f"caption-{i:06d}", "kind": "caption", "images": [rel],
                                        "text": IMAGE_PLACEHOLDER + image_caption(meta, rng)})
    rng = _rng(seed, "ocr")
    for i in range(_count(BASE_COUNTS["ocr.jsonl"], scale)):
        rel, meta = pools["ocr"][i % len(pools["ocr"])]
        files["ocr.jsonl"].append({"id": f"ocr-{i:06d}", "kind": "ocr", "images": [rel],
                                   "text": IMAGE_PLACEHOLDER + image_caption(meta, rng)})
    rng = _rng(seed, "interleaved")
    for i in range(_count(BASE_COUNTS["interleaved.jsonl"], scale)):
        images, text = _interleaved_doc(rng, pools)
        files["interleaved.jsonl"].append({"id": f"interleaved-{i:06d}", "kind": "interleaved",
                                           "images": images, "text": text})
    return files


def _text_files(scale: float) -> dict[str, list[dict]]:
    """text.jsonl and eval_text.jsonl: every HELD_OUT_EVERY-th chunk is held out for the language evaluation
    (train.eval_text), never trained on."""
    chunks = text_chunks()
    if scale < 1:
        chunks = chunks[:_count(len(chunks), scale)]
    return {"text.jsonl": [{"id": f"text-{i:06d}", "kind": "text", "text": c} for i, c in enumerate(chunks)
                           if i % HELD_OUT_EVERY],
            "eval_text.jsonl": [{"id": f"text-{i:06d}", "kind": "text", "text": c}
                                for i, c in enumerate(chunks) if i % HELD_OUT_EVERY == 0]}


def _sft_rows(pools: dict[str, Pool], seed: int, scale: float) -> list[dict]:
    """sft.jsonl: chats about an image (SFT_IMAGE_MIX) and, SFT_TEXT_FRACTION of them, text-only chats."""
    rng = _rng(seed, "sft")
    facts, sentences = text_chat_sources()
    rows = []
    for i in range(_count(BASE_COUNTS["sft.jsonl"], scale)):
        if rng.random() < SFT_TEXT_FRACTION:
            images, conversation = [], text_conversation(rng, facts, sentences)
        else:
            rel, meta = _choose(rng, pools, SFT_IMAGE_MIX)
            images, conversation = [rel], image_conversation(rng, meta)
        rows.append({"id": f"sft-{i:06d}", "kind": "sft", "images": images, "conversation": conversation})
    return rows


def _write_training_formats(out: Path, verbose: bool, t0: float) -> None:
    """The training formats the trainer reads: webdataset shards for the multimodal files, a Megatron
    .bin/.idx corpus for the text."""
    from .convert import convert_demo
    from .tokenize_corpus import tokenize_corpus

    convert_demo(out, out / "shards", verbose=False, overwrite=True)
    tokenize_corpus([out / "text.jsonl"], out / TOKENIZER_FILE, out / "corpus" / "text", append_eos=True,
                    workers=1, progress=False)
    if verbose:
        print(f"  shards/ and corpus/text.bin|idx written ({time.perf_counter() - t0:.1f}s)")


def generate_demo(out_dir: str | os.PathLike, seed: int = 0, scale: float = 1.0,
                  vocab_size: int = DEFAULT_VOCAB_SIZE, verbose: bool = True) -> dict:
    """Write the whole demo dataset (images, JSONL files, tokenizer, manifest) into out_dir.

    Returns the manifest dict. manifest.json is written last, so its presence
    means the directory is complete.
    """
    if seed < 0 or scale <= 0:
        raise ValueError(f"need seed >= 0 and scale > 0, got seed={seed}, scale={scale}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():  # the directory is incomplete until the new manifest is written
        manifest_path.unlink()
    pools, eval_rows, written = _write_images(out, seed, scale, word_list(), verbose, t0)
    files = {**_image_text_files(pools, seed, scale), **_text_files(scale),
             "sft.jsonl": _sft_rows(pools, seed, scale), "eval_mc.jsonl": eval_rows}
    for name, rows in files.items():
        _write_jsonl(out / name, rows)
        if verbose:
            _report(name, len(rows), "samples", (out / name).stat().st_size, t0)

    tokenizer = train_tokenizer(iter_training_texts(out), vocab_size, out / TOKENIZER_FILE)
    if verbose:
        _report(TOKENIZER_FILE, tokenizer.get_vocab_size(), "vocab", (out / TOKENIZER_FILE).stat().st_size, t0)
    _write_training_formats(out, verbose, t0)

    manifest = {"seed": seed, "scale": scale, "files": {name: len(rows) for name, rows in files.items()},
                "images": {"train": len(written) - len(eval_rows), "eval": len(eval_rows)},
                "image_size": IMAGE_SIZE, "tokenizer": TOKENIZER_FILE, "vocab_size": tokenizer.get_vocab_size(),
                "special_tokens": dict(SPECIAL_TOKENS), "special_token_ids": dict(SPECIAL_TOKEN_IDS)}
    write_text_atomic(manifest_path, json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    if verbose:
        print(f"done: {out} in {time.perf_counter() - t0:.1f}s")
    return manifest
