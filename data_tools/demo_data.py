"""Deterministic demo dataset for vision-language pretraining (nothing is downloaded).

Images are synthetic 128x128 RGB PNGs (shapes, two shapes, OCR words, bar charts);
text comes from the Python documentation that ships with Python (pydoc_data).
Every random choice comes from a numpy Generator seeded from (seed, stream name),
so the same seed always gives byte-identical files, and the held-out eval images
come from their own stream and are never used by a training file.
"""

from __future__ import annotations

import json
import os
import re
import time
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlpretrain.files import write_text_atomic

from .tokenizer import DEFAULT_VOCAB_SIZE, IMAGE_PLACEHOLDER, SPECIAL_TOKEN_IDS, SPECIAL_TOKENS, TOKENIZER_FILE
from .tokenizer import iter_training_texts, train_tokenizer

IMAGE_SIZE = 128
COLOURS: dict[str, tuple[int, int, int]] = {  # saturated and far apart, so never confused
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 230),
    "yellow": (240, 205, 0), "purple": (140, 50, 180), "orange": (250, 125, 10),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BAR_NAMES = "ABCD"
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}

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
# one-shape question but depends on image and question jointly (as "shortest bar" did, see _qa_pairs); with
# them (0.1) and 10% text chats, shape / tallest bar ended stage 3 at 0.52 / 0.62, without them and with 5%
# text chats at 0.66 / 0.92 from the same stage-2 weights (issue 16). Two-shape images stay in the captions
# and interleaved documents.
SFT_IMAGE_MIX = {"shape": 0.5, "ocr": 0.1, "chart": 0.4}
# Text-only chats have answers ~5x longer than the image answers, so at 0.3 they took most of stage 3's
# supervised tokens; at 0.1 shape / tallest bar came out 0.44 / 0.56 instead of 0.34 / 0.34 (issue 16).
SFT_TEXT_FRACTION = 0.05

Meta = dict[str, Any]
Pool = list[tuple[str, Meta]]  # (image path relative to the output dir, metadata)


def _rng(seed: int, stream: str) -> np.random.Generator:
    """An independent generator per stream, so changing one file's count never changes another."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode())])


def _pick(rng: np.random.Generator, items: Iterable[Any]) -> Any:
    items = list(items)
    return items[int(rng.integers(len(items)))]


def _count(base: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, int(round(base * scale)))


# ----------------------------------------------------------------------------- text corpus

_UNDERLINE = re.compile(r"^\s*([*=\-~^])\1{2,}\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+(?=[A-Z\"])")


def _topic_paragraphs(text: str) -> list[str]:
    """Paragraphs of one pydoc topic: rst underlines dropped, trailing spaces stripped."""
    lines = [line.rstrip() for line in text.splitlines() if not _UNDERLINE.match(line)]
    return [p.strip("\n") for p in re.split(r"\n\s*\n", "\n".join(lines)) if p.strip()]


def _is_prose(paragraph: str) -> bool:
    return not paragraph[0].isspace() and "::=" not in paragraph and not paragraph.startswith(">>>")


def _split_long(paragraph: str, max_chars: int) -> list[str]:
    """Split a paragraph longer than max_chars at line boundaries."""
    if len(paragraph) <= max_chars:
        return [paragraph]
    pieces, current = [], ""
    for line in paragraph.split("\n"):
        while len(line) > max_chars:  # a single huge line: hard split
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        if current and len(current) + 1 + len(line) > max_chars:
            pieces.append(current)
            current = line
        else:
            current = f"{current}\n{line}" if current else line
    if current:
        pieces.append(current)
    return pieces


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {key: topics[key] for key in sorted(topics)}


def text_chunks(min_chars: int = 600, max_chars: int = 1200) -> list[str]:
    """All of pydoc_data's topics as chunks of ~min..max characters cut at paragraph boundaries."""
    chunks: list[str] = []
    for text in _topics().values():
        current: list[str] = []
        size = 0
        topic_start = len(chunks)
        for paragraph in _topic_paragraphs(text):
            for piece in _split_long(paragraph, max_chars):
                # A short start (e.g. a heading) stays with the next piece even if that overflows.
                if current and size + len(piece) > max_chars and size >= 200:
                    chunks.append("\n\n".join(current))
                    current, size = [], 0
                current.append(piece)
                size += len(piece) + 2
                if size >= min_chars:
                    chunks.append("\n\n".join(current))
                    current, size = [], 0
        if current:
            tail = "\n\n".join(current)
            if len(tail) < 200 and len(chunks) > topic_start:  # too short alone: join the topic's last chunk
                chunks[-1] = f"{chunks[-1]}\n\n{tail}"
            else:
                chunks.append(tail)
    return chunks


def _sentences(paragraph: str) -> list[str]:
    flat = " ".join(paragraph.split())
    return [s for s in _SENTENCE_END.split(flat) if 40 <= len(s) <= 200 and len(s.split()) >= 6]


def _text_chat_sources() -> tuple[list[tuple[str, str]], list[str]]:
    """(topic name, first sentence) pairs and a list of prose sentences for text-only chat."""
    facts, sentences = [], []
    for key, text in _topics().items():
        prose = [p for p in _topic_paragraphs(text)[1:] if _is_prose(p)]  # [0] is the title
        if prose:
            first = " ".join(prose[0].split())
            facts.append((key, _SENTENCE_END.split(first)[0]))
        for paragraph in prose:
            sentences.extend(_sentences(paragraph))
    return facts, sentences


def _word_list() -> list[str]:
    """Plain words of 3-8 letters from the corpus, for the OCR images."""
    words = set()
    for text in _topics().values():
        words.update(w.lower() for w in re.findall(r"\b[A-Za-z]{3,8}\b", text))
    return sorted(w for w in words if len(set(w)) >= 3)  # drops "ooo", "aaa" and the like


# ----------------------------------------------------------------------------- images


def _font() -> ImageFont.ImageFont:
    # load_default() is a FreeType font when FreeType is available; the bitmap font
    # renders identically everywhere and without anti-aliasing.
    if hasattr(ImageFont, "load_default_imagefont"):
        return ImageFont.load_default_imagefont()
    return ImageFont.load_default()


def _text_mask(text: str, scale: int) -> Image.Image:
    """Text as an L mask (255 = ink), drawn with the bitmap font and scaled up with NEAREST."""
    font = _font()
    _, _, right, bottom = font.getbbox(text)
    small = Image.new("L", (right + 2, bottom + 2), 0)
    ImageDraw.Draw(small).text((1, 1), text, font=font, fill=255)
    return small.resize((small.width * scale, small.height * scale), Image.Resampling.NEAREST)


def _background(rng: np.random.Generator) -> Image.Image:
    """White or light grey with slight noise; the noise is blocky so the PNGs stay small."""
    base = 252 if rng.random() < 0.5 else 228
    noise = rng.integers(-5, 4, size=(IMAGE_SIZE // 4, IMAGE_SIZE // 4), dtype=np.int16)
    grey = Image.fromarray((base + noise).astype(np.uint8), "L")
    return grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST).convert("RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, obj: Meta) -> None:
    cx, cy, half = obj["cx"], obj["cy"], obj["size"] // 2
    fill = COLOURS[obj["colour"]]
    if obj["shape"] == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif obj["shape"] == "square":
        side = half * 9 // 10  # a full-size square looks much bigger than the circle
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
    elif obj["shape"] == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    else:  # cross
        arm = obj["size"] // 6
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)


def _sample_object(rng: np.random.Generator, shape: int, colour: int, position: int) -> Meta:
    quarter = IMAGE_SIZE // 4
    cx = quarter * (1 + 2 * (position % 2)) + int(rng.integers(-4, 5))
    cy = quarter * (1 + 2 * (position // 2)) + int(rng.integers(-4, 5))
    return {"shape": SHAPES[shape], "colour": list(COLOURS)[colour], "position": POSITIONS[position],
            "cx": cx, "cy": cy, "size": int(rng.integers(40, 53))}


def make_image(kind: str, rng: np.random.Generator, words: list[str],
               n_bars: int | None = None) -> tuple[Image.Image, Meta]:
    """Draw one synthetic image of `kind` and return it with its metadata."""
    if kind in ("shape", "two_shapes"):
        n = 1 if kind == "shape" else 2
        shapes = rng.choice(len(SHAPES), n, replace=False)  # distinct shapes: questions stay unambiguous
        positions = rng.choice(len(POSITIONS), n, replace=False)
        objects = [_sample_object(rng, int(s), int(rng.integers(len(COLOURS))), int(p))
                   for s, p in zip(shapes, positions)]
        image = _background(rng)
        draw = ImageDraw.Draw(image)
        for obj in objects:
            _draw_shape(draw, obj)
        return image, {"kind": kind, "objects": objects}
    if kind == "ocr":
        if rng.random() < 0.25:
            digits = int(rng.integers(3, 9))
            text = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
        else:
            text = _pick(rng, words)
            text = _pick(rng, (text, text.upper(), text.capitalize()))
        mask = _text_mask(text, 1)
        scale = max(1, min(6, (IMAGE_SIZE - 12) // mask.width, 90 // mask.height))
        mask = _text_mask(text, scale)
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
        x = (IMAGE_SIZE - mask.width) // 2 + int(rng.integers(-3, 4))
        y = (IMAGE_SIZE - mask.height) // 2 + int(rng.integers(-8, 9))
        image.paste((0, 0, 0), (x, y), mask)
        return image, {"kind": "ocr", "text": text}
    if kind == "chart":
        n = n_bars or int(rng.integers(3, 5))
        values = [int(v) + 1 for v in rng.choice(9, n, replace=False)]  # distinct: one tallest bar
        colours = [list(COLOURS)[int(c)] for c in rng.choice(len(COLOURS), n, replace=False)]
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        base_y, slot = 108, (IMAGE_SIZE - 16) // n
        width = slot * 3 // 5
        for i, (value, colour) in enumerate(zip(values, colours)):
            x0 = 12 + i * slot + (slot - width) // 2
            draw.rectangle((x0, base_y - value * 9, x0 + width, base_y - 1), fill=COLOURS[colour])
            label = _text_mask(BAR_NAMES[i], 1)
            image.paste((0, 0, 0), (x0 + (width - label.width) // 2, base_y + 3), label)
        draw.line((8, base_y, IMAGE_SIZE - 6, base_y), fill=(0, 0, 0), width=2)
        draw.line((8, 16, 8, base_y), fill=(0, 0, 0), width=2)
        bars = dict(zip(BAR_NAMES, values))
        return image, {"kind": "chart", "bars": bars, "colours": dict(zip(BAR_NAMES, colours)),
                       "tallest": max(bars, key=bars.__getitem__)}
    raise ValueError(f"unknown image kind {kind!r}")


# ----------------------------------------------------------------------------- texts about images

SHAPE_CAPTIONS = (
    "A {colour} {shape} in the {position} corner.",
    "This image shows a {colour} {shape} at the {position}.",
    "There is a {colour} {shape} in the {position} corner of the picture.",
    "A picture of a {colour} {shape}, located in the {position}.",
    "The {position} corner contains a {colour} {shape}.",
    "A {shape} coloured {colour}, placed in the {position} corner on a plain background.",
)
TWO_SHAPE_CAPTIONS = (
    "A {c0} {s0} in the {p0} corner and a {c1} {s1} in the {p1} corner.",
    "Two shapes: a {c0} {s0} at the {p0} and a {c1} {s1} at the {p1}.",
    "This picture contains a {c0} {s0} ({p0}) and a {c1} {s1} ({p1}).",
)
CHART_CAPTIONS = (
    "A bar chart with {n} bars; bar {t} is the tallest.",
    "A bar chart with bars {names}. The tallest bar is {t}.",
    "Bar chart: bar {t} has the largest value of the {n} bars.",
)
OCR_CAPTIONS = (
    "The text in the image reads: {text}",
    "The image contains the text \"{text}\".",
    "Written in large black letters: {text}",
    "This picture shows the {what} {text}.",
)
# The first phrasing of each question is the one used by the eval set.
QUESTIONS = {
    "colour": ("What colour is the shape?", "What is the colour of the shape?", "Which colour does the shape have?"),
    "shape": ("What shape is shown in the image?", "What kind of shape is this?", "Which shape do you see?"),
    "position": ("In which corner is the shape?", "Where is the shape located?", "Where is the shape?"),
    "tallest_bar": ("Which bar is the tallest?", "Which bar has the largest value?"),
    "tallest_colour": ("What colour is the tallest bar?",),
    "bar_count": ("How many bars are in the chart?",),
    "ocr": ("What does the text in the image say?", "Read the text in the image.", "What is written in the image?"),
}


def answer_text(kind: str, value: str) -> str:
    """The one answer form shared by sft answers and eval options, e.g. "Red.", "Top left.", "Bar C."."""
    if kind == "tallest_bar":
        return f"Bar {value}."
    if kind == "ocr":
        return value
    return f"{value[0].upper()}{value[1:]}."


def _fix_articles(text: str) -> str:
    """'a orange circle' -> 'an orange circle' (only for our generated sentences)."""
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def _names(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1]


def _caption(meta: Meta, rng: np.random.Generator) -> str:
    if meta["kind"] == "shape":
        o = meta["objects"][0]
        return _fix_articles(_pick(rng, SHAPE_CAPTIONS).format(**o))
    if meta["kind"] == "two_shapes":
        a, b = meta["objects"]
        caption = _pick(rng, TWO_SHAPE_CAPTIONS).format(c0=a["colour"], s0=a["shape"], p0=a["position"],
                                                        c1=b["colour"], s1=b["shape"], p1=b["position"])
        return _fix_articles(caption)
    if meta["kind"] == "chart":
        names = list(meta["bars"])
        n = NUMBER_WORDS[len(names)]
        return _pick(rng, CHART_CAPTIONS).format(n=n, names=_names(names), t=meta["tallest"])
    text = meta["text"]
    return _pick(rng, OCR_CAPTIONS).format(text=text, what="number" if text.isdigit() else "word")


def _describe(meta: Meta) -> str:
    """A noun phrase for interleaved documents, e.g. 'a blue square in the bottom right corner'."""
    if meta["kind"] == "chart":
        n = NUMBER_WORDS[len(meta["bars"])]
        return f"a bar chart with {n} bars where bar {meta['tallest']} is the tallest"
    if meta["kind"] == "ocr":
        return f"the {'number' if meta['text'].isdigit() else 'word'} \"{meta['text']}\""
    return " and ".join(f"a {o['colour']} {o['shape']} in the {o['position']} corner" for o in meta["objects"])


def _qa_pairs(meta: Meta) -> list[tuple[str, str, str]]:
    """(type, question, answer) for every fact about an image; an empty question means
    "pick a phrasing from QUESTIONS[type]"."""
    kind = meta["kind"]
    if kind == "shape":
        o = meta["objects"][0]
        return [(t, "", answer_text(t, o[t])) for t in ("colour", "shape", "position")]
    if kind == "two_shapes":
        pairs = []
        for o in meta["objects"]:
            pairs.append(("colour", f"What colour is the {o['shape']}?", answer_text("colour", o["colour"])))
            pairs.append(("shape", f"What shape is in the {o['position']} corner?",
                          answer_text("shape", o["shape"])))
            pairs.append(("position", f"Where is the {o['shape']}?", answer_text("position", o["position"])))
        return pairs
    if kind == "chart":
        # No "which bar is the shortest?": asked about the same charts with the same answer form as "tallest",
        # its answer depends on image and question jointly, and the tiny LLM (from scratch, no notion of
        # tallest vs shortest) then learns neither: tallest stayed at chance (issue 16). The colour of the
        # tallest bar has an answer form of its own and trains the same skill.
        tallest = meta["tallest"]
        return [("tallest_bar", "", answer_text("tallest_bar", tallest)),
                ("tallest_colour", "", answer_text("colour", meta["colours"][tallest])),
                ("bar_count", "", f"{NUMBER_WORDS[len(meta['bars'])].capitalize()}.")]
    return [("ocr", "", answer_text("ocr", meta["text"]))]


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
    return _pick(rng, pools[kind])


def _interleaved_doc(rng: np.random.Generator, pools: dict[str, Pool]) -> tuple[list[str], str]:
    n = int(rng.integers(2, 4))
    picked: Pool = []
    while len(picked) < n:
        item = _choose(rng, pools, {"shape": 0.5, "two_shapes": 0.2, "ocr": 0.15, "chart": 0.15})
        if item[0] not in (p[0] for p in picked):
            picked.append(item)
    ph = IMAGE_PLACEHOLDER
    parts = [_pick(rng, ("Here is a picture.", "Let us look at some pictures.", "This page has a few images.",
                         "Below are several images.")), f"{ph} It shows {_describe(picked[0][1])}."]
    for i, (_, meta) in enumerate(picked[1:], start=1):
        link = "Finally," if i == n - 1 and n > 2 else _pick(rng, ("Next,", "Then,", "After that,"))
        parts.append(f"{link} {ph} {_pick(rng, ('shows', 'contains', 'has'))} {_describe(meta)}.")
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
    return [p for p, _ in picked], _fix_articles(" ".join(parts))


def _image_conversation(rng: np.random.Generator, meta: Meta) -> list[dict[str, str]]:
    pairs = _qa_pairs(meta)
    n_turns = min(len(pairs), int(rng.integers(1, 3)))
    turns = []
    for j, k in enumerate(rng.choice(len(pairs), n_turns, replace=False)):
        kind, question, answer = pairs[int(k)]
        question = question or _pick(rng, QUESTIONS[kind])
        turns.append({"role": "User", "content": f"{IMAGE_PLACEHOLDER}\n{question}" if j == 0 else question})
        turns.append({"role": "Assistant", "content": answer})
    return turns


def _text_conversation(rng: np.random.Generator, facts: list[tuple[str, str]],
                       sentences: list[str]) -> list[dict[str, str]]:
    mode = int(rng.integers(3))
    if mode == 0:
        topic, first = _pick(rng, facts)
        question, answer = f"What is the Python documentation topic '{topic}' about?", first
    else:
        sentence = _pick(rng, sentences)
        if mode == 1:
            words = sentence.split()
            cut = len(words) // 2
            question = f"Complete the sentence: {' '.join(words[:cut])} ..."
            answer = " ".join(words[cut:])
        else:
            question, answer = f"Repeat the following sentence exactly: {sentence}", sentence
    return [{"role": "User", "content": question}, {"role": "Assistant", "content": answer}]


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
    words = _word_list()

    pools = {kind: _make_pool(out, kind, _count(n, scale, 4), _rng(seed, f"images/{kind}"), words)
             for kind, n in POOL_SIZES.items()}
    eval_rows = _eval_set(out, _count(BASE_COUNTS["eval_mc.jsonl"], scale, 4), _rng(seed, "eval"), words)
    written = {rel for pool in pools.values() for rel, _ in pool} | {r["images"][0] for r in eval_rows}
    for stale in (out / "images").glob("*.png"):  # left over from an earlier, larger run
        if f"images/{stale.name}" not in written:
            stale.unlink()
    if verbose:
        _report("images/", len(written), "PNGs", sum((out / rel).stat().st_size for rel in written), t0)

    files: dict[str, list[dict]] = {"captions.jsonl": [], "ocr.jsonl": [], "interleaved.jsonl": []}
    rng = _rng(seed, "captions")
    for i in range(_count(BASE_COUNTS["captions.jsonl"], scale)):
        rel, meta = _choose(rng, pools, {"shape": 0.7, "two_shapes": 0.15, "chart": 0.15})
        files["captions.jsonl"].append({"id": f"caption-{i:06d}", "kind": "caption", "images": [rel],
                                        "text": IMAGE_PLACEHOLDER + _caption(meta, rng)})
    rng = _rng(seed, "ocr")
    for i in range(_count(BASE_COUNTS["ocr.jsonl"], scale)):
        rel, meta = pools["ocr"][i % len(pools["ocr"])]
        files["ocr.jsonl"].append({"id": f"ocr-{i:06d}", "kind": "ocr", "images": [rel],
                                   "text": IMAGE_PLACEHOLDER + _caption(meta, rng)})
    rng = _rng(seed, "interleaved")
    for i in range(_count(BASE_COUNTS["interleaved.jsonl"], scale)):
        images, text = _interleaved_doc(rng, pools)
        files["interleaved.jsonl"].append({"id": f"interleaved-{i:06d}", "kind": "interleaved",
                                           "images": images, "text": text})

    chunks = text_chunks()
    if scale < 1:
        chunks = chunks[:_count(len(chunks), scale)]
    # every HELD_OUT_EVERY-th chunk is held out for the language evaluation (train.eval_text), never trained on
    files["text.jsonl"] = [{"id": f"text-{i:06d}", "kind": "text", "text": c} for i, c in enumerate(chunks)
                           if i % HELD_OUT_EVERY]
    files["eval_text.jsonl"] = [{"id": f"text-{i:06d}", "kind": "text", "text": c}
                                for i, c in enumerate(chunks) if i % HELD_OUT_EVERY == 0]

    rng = _rng(seed, "sft")
    facts, sentences = _text_chat_sources()
    files["sft.jsonl"] = []
    for i in range(_count(BASE_COUNTS["sft.jsonl"], scale)):
        if rng.random() < SFT_TEXT_FRACTION:
            images, conversation = [], _text_conversation(rng, facts, sentences)
        else:
            rel, meta = _choose(rng, pools, SFT_IMAGE_MIX)
            images, conversation = [rel], _image_conversation(rng, meta)
        files["sft.jsonl"].append({"id": f"sft-{i:06d}", "kind": "sft", "images": images,
                                   "conversation": conversation})
    files["eval_mc.jsonl"] = eval_rows

    for name, rows in files.items():
        _write_jsonl(out / name, rows)
        if verbose:
            _report(name, len(rows), "samples", (out / name).stat().st_size, t0)

    tokenizer = train_tokenizer(iter_training_texts(out), vocab_size, out / TOKENIZER_FILE)
    if verbose:
        _report(TOKENIZER_FILE, tokenizer.get_vocab_size(), "vocab", (out / TOKENIZER_FILE).stat().st_size, t0)

    # the training formats the trainer reads: webdataset shards for the multimodal files, a Megatron
    # .bin/.idx corpus for the text
    from .convert import convert_demo
    from .tokenize_corpus import tokenize_corpus

    convert_demo(out, out / "shards", verbose=False, overwrite=True)
    tokenize_corpus([out / "text.jsonl"], out / TOKENIZER_FILE, out / "corpus" / "text", append_eos=True,
                    workers=1, progress=False)
    if verbose:
        print(f"  shards/ and corpus/text.bin|idx written ({time.perf_counter() - t0:.1f}s)")

    manifest = {"seed": seed, "scale": scale, "files": {name: len(rows) for name, rows in files.items()},
                "images": {"train": len(written) - len(eval_rows), "eval": len(eval_rows)},
                "image_size": IMAGE_SIZE, "tokenizer": TOKENIZER_FILE, "vocab_size": tokenizer.get_vocab_size(),
                "special_tokens": dict(SPECIAL_TOKENS), "special_token_ids": dict(SPECIAL_TOKEN_IDS)}
    write_text_atomic(manifest_path, json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    if verbose:
        print(f"done: {out} in {time.perf_counter() - t0:.1f}s")
    return manifest
