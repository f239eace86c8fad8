"""The demo's synthetic images: 128x128 RGB shapes, two shapes, OCR words and bar charts, drawn with PIL from a
numpy Generator (the same generator state always draws the same pixels), each with the metadata its texts use."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 128
COLOURS: dict[str, tuple[int, int, int]] = {  # saturated and far apart, so never confused
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 230),
    "yellow": (240, 205, 0), "purple": (140, 50, 180), "orange": (250, 125, 10),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BAR_NAMES = "ABCD"

Meta = dict[str, Any]


def pick(rng: np.random.Generator, items: Iterable[Any]) -> Any:
    """One of ``items``, by one draw of ``rng``."""
    items = list(items)
    return items[int(rng.integers(len(items)))]


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
            text = pick(rng, words)
            text = pick(rng, (text, text.upper(), text.capitalize()))
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
