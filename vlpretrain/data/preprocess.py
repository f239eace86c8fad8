"""Image preprocessing exactly as DeepSeek-VL's released ``VLMImageProcessor`` does it, on uint8 torch tensors.

The official processor (``deepseek_vl/models/image_processing_vlm.py``), for an image of width ``w`` and height
``h`` and a target ``image_size`` (1024 for the hybrid 7B, 384 for the 1.3B):

1. resizes so that the LONGER side equals ``image_size``; the other side is
   ``max(int(side / max(w, h) * image_size), min_size)`` with ``min_size = 14`` (torchvision ``resize`` on a PIL
   image, BICUBIC, i.e. PIL's antialiased bicubic filter);
2. pads to a square canvas of the background colour ``tuple(int(x * 255) for x in image_mean)`` (CLIP mean
   (0.48145466, 0.4578275, 0.40821073) -> (122, 116, 104) for the hybrid model, 0.5 -> (127, 127, 127) for the
   1.3B), the resized image pasted at ``((size - w') // 2, (size - h') // 2)``;
3. divides by 255 -> float in [0, 1]. (The hybrid model's towers normalise internally; SigLIP's 384 input is
   derived inside the model from the 1024 image by antialiased bilinear resizing, see ``models/vision.py``.)

Resizing here is ``F.interpolate(mode="bicubic", antialias=True)`` on the uint8 tensor itself. On CPU torch's
uint8 + antialias kernel uses PIL's cubic filter (a = -0.5, support widened by the downscale factor) and matches
PIL's BICUBIC resize almost bit for bit. Measured on torch 2.14.1 (CPU), photo-like and noise images, 640x480 ->
1024x768 and 300x300 -> 1024 (upscale), 2000x1500 -> 1024x768 and 640x480 -> 384x288 (downscale), 100x1000 ->
14x140 (min_size): mean |torch - PIL| <= 0.009 levels, max 2 levels, >= 99.1 % of pixels identical; torch 2.13.0
and 2.11.0 give the same (uint8 supported, 640x480 -> 1024x768: mean 0.00001, max 1; -> 384x288: mean 0.0006,
max 1). The same resize in float32, rounded and clamped back, differs from PIL by 0.15-0.27 levels on average and
by up to 4 levels on photo-like images (23 on pure noise: PIL rounds and clips between its two passes), and is
~15x slower on CPU (50 ms vs 3.4 ms for 640x480 -> 1024x768), so it is only the fallback: for tensors on other
devices (torchvision treats uint8 bicubic as CPU-only) and for a torch without the uint8 kernel (it exists on
CPU since torch 2.1; torchvision >= 0.16 relies on it).

Images come in as uint8 (3, H, W) RGB tensors: :func:`load_image` reads a file, :func:`decode_image` encoded bytes
(a shard member, a Parquet cell; an undecodable image is a ``shards.BadSample``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlpretrain.data.shards import BadSample

MIN_SIZE = 14  # VLMImageProcessor's default min_size
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
log = logging.getLogger(__name__)


def load_image(path: str | Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB of an image file, decoded as :func:`decode_image` decodes bytes (bit depth, pixel
    budget, warnings); Pillow's errors are raised as they are, an image over the pixel budget as a ``BadSample``."""
    with _capture_warnings() as state, Image.open(path) as im:
        return _pixels(im, None, state, None, str(path))


def decode_image(raw: bytes, shard: str | None = None, key: str | None = None):
    """Raw image bytes -> torch uint8 tensor (3, H, W), RGB. Raises :class:`BadSample` on undecodable data.

    PIL reads the header first (format, size, its decompression-bomb check); the pixel budget is decided on that
    size before anything is decoded (:func:`decoding`). Baseline RGB / grey JPEGs are then decoded by
    torchvision's libjpeg-turbo straight into a (3, H, W) tensor (the same pixels as PIL: same library and
    settings, tested; 1.1 vs 1.9 ms for a 640x480 photo, and a contiguous result, which the uint8 resize after
    it runs faster on). Everything else, any JPEG torchvision refuses and any JPEG decoded at reduced size goes
    through PIL; greyscale of more than 8 bits is scaled to 8 (:func:`_grey_to_uint8`).
    """
    try:
        with _capture_warnings() as state, Image.open(io.BytesIO(raw)) as im:
            return _pixels(im, raw, state, shard, key)
    except BadSample:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise BadSample(f"undecodable image: {type(e).__name__}: {e}", shard, key) from None


# ---- decode settings and notes: the pixel budget, and Pillow's warnings reported once per source

DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192  # the default of data.max_image_pixels (a test checks they agree)
_DRAFT_SCALES = (1, 2, 4, 8)  # what libjpeg can decode at: 1/1 .. 1/8 of the size


@dataclass
class _Scope:
    max_pixels: int  # 0: no budget (Pillow's own limit only)
    notes: list[tuple[str, str]]


_SCOPE: ContextVar[_Scope | None] = ContextVar("vlpretrain_image_decoding", default=None)
_logged: set[str] = set()  # note kinds logged outside any decoding() scope (once per process)


@contextlib.contextmanager
def decoding(max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Iterator[list[tuple[str, str]]]:
    """Settings for the images decoded inside the block (this thread / context only, restored after):

    * ``max_pixels`` (``data.max_image_pixels``; 0: none): an image whose header gives more pixels is decoded
      at reduced size where the format allows (a JPEG: libjpeg's 1/2, 1/4, 1/8 scaling, ``Image.draft``, the
      smallest reduction within the budget), else it is a ``BadSample`` (skipped and counted by the caller),
      never decoded at full size;
    * the yielded list collects ``(kind, message)`` notes: Pillow's warnings (``DecompressionBombWarning``, a
      palette or EXIF warning, ...) and reduced-size decodes, for the caller to report once per source
      (``loader.DataPipeline``). Outside any scope the budget is the default and each kind of note is logged
      once per process."""
    notes: list[tuple[str, str]] = []
    token = _SCOPE.set(_Scope(int(max_pixels), notes))
    try:
        yield notes
    finally:
        _SCOPE.reset(token)


def _note(kind: str, message: str) -> None:
    scope = _SCOPE.get()
    if scope is not None:
        scope.notes.append((kind, message))
    elif kind not in _logged:
        _logged.add(kind)
        log.warning("%s (further %s notes are not repeated)", message, kind)


def _from_pil(w: warnings.WarningMessage) -> bool:
    return issubclass(w.category, Image.DecompressionBombWarning) or \
        f"{os.sep}PIL{os.sep}" in str(w.filename)


@contextlib.contextmanager
def _capture_warnings():
    """Warnings raised while an image is opened and decoded: Pillow's become notes (once per source, not
    printed raw at every draw), others are re-issued as they came (the user's filters apply). The warnings
    filters are restored on exit (``catch_warnings``). ``state["over_budget"]``: the budget handled this image,
    so Pillow's decompression-bomb warning about it says nothing more and is dropped."""
    state, caught = {"over_budget": False}, []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield state
    finally:  # also when the image is skipped: its other warnings are still reported
        for w in caught:
            if not _from_pil(w):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
            elif not (state["over_budget"] and issubclass(w.category, Image.DecompressionBombWarning)):
                _note(w.category.__name__, f"Pillow: {w.category.__name__}: {w.message}")


def _pixels(im: Image.Image, raw: bytes | None, state: dict, shard: str | None, key: str | None) -> torch.Tensor:
    """The opened (header read, nothing decoded) image as uint8 (3, H, W) RGB, within the pixel budget."""
    scope = _SCOPE.get()
    budget = DEFAULT_MAX_IMAGE_PIXELS if scope is None else scope.max_pixels
    w, h = im.size
    if budget and w * h > budget:
        state["over_budget"] = True
        over = f"image of {w}x{h} = {w * h} pixels is over data.max_image_pixels={budget}"
        k = next((k for k in _DRAFT_SCALES if -(-w // k) * -(-h // k) <= budget), None)
        if k is None or im.draft(im.mode if im.mode in ("RGB", "L") else None, (w // k, h // k)) is None:
            why = "even at 1/8 scale" if k is None else f"and a {im.format} image cannot be decoded at reduced size"
            raise BadSample(f"{over} {why}: skipped", shard, key)
        if im.size[0] * im.size[1] > budget:
            raise BadSample(f"{over} and still {im.size[0]}x{im.size[1]} at reduced size: skipped", shard, key)
        _note("reduced", f"{over}: decoded at reduced size {im.size[0]}x{im.size[1]}")
    elif raw is not None and im.format == "JPEG" and im.mode in ("RGB", "L"):
        fast = _decode_jpeg(raw)
        if fast is not None:
            return fast
    im.load()
    if im.mode in _HIGH_BIT_GREY:
        g = _grey_to_uint8(im)
        arr = np.repeat(g[:, :, None], 3, axis=2)  # as convert("L").convert("RGB"): grey in R, G and B
    else:  # (an RGB image as it is: convert("RGB") would copy it, 4 more bytes a pixel at the peak)
        arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr).copy()).permute(2, 0, 1)


_HIGH_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _grey_to_uint8(im: Image.Image) -> np.ndarray:
    """(H, W) uint8 of a greyscale image of more than 8 bits, scaled by its nominal range: Pillow's
    ``convert("RGB")`` clips these to 255 instead (a 16-bit PNG turned near white).

    ``I;16*``: 16 bits, ``round(v / 257)`` (65535 -> 255, 257 k -> k). ``I`` (32-bit int): the bit depth the
    file states (a PNG's ``I`` is 16-bit; a TIFF's BitsPerSample, e.g. 12), else from the values' real range:
    max <= 255 taken as 8-bit, <= 65535 as 16-bit, larger stretched min..max. ``F`` (float): [0, 1] times 255,
    [0, 255] as it is, else stretched min..max. Negative values and NaN go to 0."""
    a = np.asarray(im)
    if im.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0 and hi <= 1:
            a = a * 255.0
        elif not (lo >= 0 and hi <= 255):
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    a = a.astype(np.int64)
    bits = 16 if im.mode.startswith("I;16") else _stated_bits(im)
    if bits is None:
        hi = int(a.max()) if a.size else 0
        bits = 8 if hi <= 255 else 16 if hi <= 65535 else None
    if bits is None:  # 32-bit values without a stated depth: stretch the real range
        lo, hi = int(a.min()), int(a.max())
        return np.clip(((a - lo) * 255 + (hi - lo) // 2) // max(hi - lo, 1), 0, 255).astype(np.uint8)
    top = (1 << bits) - 1
    return np.clip((np.clip(a, 0, top) * 255 + top // 2) // top, 0, 255).astype(np.uint8)


def _stated_bits(im: Image.Image) -> int | None:
    """The greyscale bit depth a file states for Pillow's mode ``I``, or None."""
    if im.format == "PNG":
        return 16  # a PNG sample has at most 16 bits; Pillow reads 16-bit grey as I;16 (or I in older versions)
    tags = getattr(im, "tag_v2", None)
    if tags is not None:
        b = tags.get(258)  # TIFF BitsPerSample
        b = b[0] if isinstance(b, tuple) and b else b
        if isinstance(b, int) and 8 < b <= 32:
            return b
    return None


def _decode_jpeg(raw: bytes):
    """torchvision's JPEG decoder, RGB (3, H, W) uint8; None when it is missing or refuses the data."""
    # (torchvision 0.29 announces a move of its decoders to torchcodec: when they go, this returns None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
            out = decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (ImportError, RuntimeError):
            return None
    return out if out.dim() == 3 and out.shape[0] == 3 else None


def background_color(mean: Sequence[float] | None) -> tuple[int, int, int]:
    """The padding colour: ``tuple(int(x * 255) for x in mean)`` (truncation, as the official code), or
    (127, 127, 127) for ``mean=None``."""
    if mean is None:
        return (127, 127, 127)
    fill = tuple(int(m * 255) for m in mean)
    if len(fill) != 3:
        raise ValueError(f"mean must have 3 values, got {list(mean)}")
    return fill  # type: ignore[return-value]


def resized_size(h: int, w: int, size: int, min_size: int = MIN_SIZE) -> tuple[int, int]:
    """(h', w') for an (h, w) image: longer side ``size``, the other ``max(int(side / longer * size), min_size)``,
    computed with the same float expression as the official code. The shorter side is capped at ``size`` (only
    matters for ``size < min_size``, where the official code would not produce a square)."""
    if h <= 0 or w <= 0 or size <= 0:
        raise ValueError(f"invalid sizes: image {h}x{w}, target {size}")
    longer = max(h, w)
    nh = min(max(int(h / longer * size), min_size), size)
    nw = min(max(int(w / longer * size), min_size), size)
    return nh, nw


def resize_uint8(img: torch.Tensor, hw: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Antialiased resize of a uint8 (3, H, W) or (N, 3, H, W) tensor to ``hw``, returned as uint8.

    Native uint8 kernel on CPU (PIL-exact up to rounding, see the module docstring); elsewhere, or if this torch
    lacks the kernel, float32 then round + clamp. Same size: returned unchanged (PIL does the same)."""
    if tuple(img.shape[-2:]) == tuple(hw):
        return img
    batched = img.dim() == 4
    x = img if batched else img.unsqueeze(0)
    x = x.contiguous()
    out = None
    if x.device.type == "cpu":
        try:
            out = F.interpolate(x, size=hw, mode=mode, antialias=True)
        except (RuntimeError, NotImplementedError):  # pragma: no cover - torch < 2.1
            out = None
    if out is None:
        out = F.interpolate(x.float(), size=hw, mode=mode, antialias=True).round_().clamp_(0, 255).to(torch.uint8)
    return out if batched else out.squeeze(0)


def pad_to_square(img: torch.Tensor, fill: tuple[int, int, int], size: int | None = None) -> torch.Tensor:
    """Centre ``img`` (3, H, W) on a square canvas of colour ``fill``: side ``max(H, W)`` or ``size``.

    The image goes at row ``(side - H) // 2``, column ``(side - W) // 2`` (as ``expand2square`` pastes it); a square
    image of the requested side is returned as it is."""
    _, h, w = img.shape
    side = max(h, w) if size is None else size
    if h > side or w > side:
        raise ValueError(f"image {h}x{w} does not fit a {side}x{side} canvas")
    if h == w == side:
        return img
    canvas = torch.tensor(fill, dtype=img.dtype, device=img.device).view(3, 1, 1).expand(3, side, side).clone()
    top, left = (side - h) // 2, (side - w) // 2
    canvas[:, top:top + h, left:left + w] = img
    return canvas


def _check(img: torch.Tensor) -> None:
    if img.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image, got {img.dtype}")
    if img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(img.shape)}")


def resize_and_pad(img: torch.Tensor, size: int, mean: Sequence[float] | None,
                   min_size: int = MIN_SIZE) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size): the official resize (longer side to ``size``, bicubic,
    antialiased) then pad with the mean colour. What :func:`preprocess_image` returns, before / 255."""
    _check(img)
    _, h, w = img.shape
    img = resize_uint8(img, resized_size(h, w, size, min_size), mode="bicubic")
    return pad_to_square(img, background_color(mean), size)


def preprocess_image(img: torch.Tensor, size: int, mean: Sequence[float] | None,
                     min_size: int = MIN_SIZE) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 (3, size, size) in [0, 1], as ``VLMImageProcessor`` (without normalisation):
    longer side resized to ``size`` (bicubic, antialiased), padded to square with ``int(mean * 255)``, / 255."""
    _check(img)
    _, h, w = img.shape
    img = resize_uint8(img, resized_size(h, w, size, min_size), mode="bicubic")
    _, h, w = img.shape
    # Straight into the float canvas (same values as uint8 canvas -> float / 255, one pass less).
    out = torch.empty(3, size, size, dtype=torch.float32, device=img.device)
    fill = torch.tensor(background_color(mean), dtype=torch.float32, device=img.device).div_(255.0).view(3, 1, 1)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, :top] = fill
    out[:, top + h:] = fill
    out[:, top:top + h, :left] = fill
    out[:, top:top + h, left + w:] = fill
    region = out[:, top:top + h, left:left + w]
    region.copy_(img)
    region.div_(255.0)
    return out
