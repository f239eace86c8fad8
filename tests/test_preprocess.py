"""Image preprocessing against DeepSeek-VL's VLMImageProcessor: longer side resized to the target (bicubic,
antialiased; the other side max(int(side / longer * size), 14)), then padded to square with int(mean * 255),
values / 255. The reference below is the official processor's logic on PIL images (torchvision's resize on a PIL
image is ``img.resize((w, h), BICUBIC)``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlpretrain.data import preprocess as pp
from vlpretrain.data.preprocess import (
    CLIP_MEAN,
    SIGLIP_MEAN,
    background_color,
    pad_to_square,
    preprocess_image,
    resize_and_pad,
    resized_size,
)

# ------------------------------------------------------------------------------------------------ reference


def _official(arr: np.ndarray, image_size: int, image_mean, min_size: int = 14) -> np.ndarray:
    """VLMImageProcessor.resize + rescale (no normalisation) on an (H, W, 3) uint8 array -> float (3, S, S)."""
    pil_img = Image.fromarray(arr)
    width, height = pil_img.size
    max_size = max(width, height)
    size = [max(int(height / max_size * image_size), min_size), max(int(width / max_size * image_size), min_size)]
    pil_img = pil_img.resize((size[1], size[0]), Image.Resampling.BICUBIC)  # torchvision F.resize on PIL
    background = tuple(int(x * 255) for x in image_mean)
    width, height = pil_img.size  # expand2square
    if width != height:
        side = max(width, height)
        result = Image.new(pil_img.mode, (side, side), background)
        result.paste(pil_img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
        pil_img = result
    return np.asarray(pil_img).transpose(2, 0, 1).astype(np.float32) / 255.0


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Photo-like: smooth random colour field plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    return np.clip(smooth + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def _t(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def _levels(ours: torch.Tensor, ref: np.ndarray) -> np.ndarray:
    return np.abs(ours.numpy() * 255.0 - ref * 255.0)


# ------------------------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize("hw, size, expected", [
    ((480, 640), 1024, (768, 1024)),   # landscape, upscale
    ((640, 480), 1024, (1024, 768)),   # portrait
    ((500, 500), 1024, (1024, 1024)),  # square
    ((480, 640), 384, (288, 384)),     # downscale (1.3B)
    ((333, 500), 1024, (681, 1024)),   # int() truncates 681.98
    ((2000, 1500), 384, (384, 288)),
    ((20, 1000), 384, (14, 384)),      # int(7.68) -> min_size 14
    ((1000, 5), 1024, (1024, 14)),
    ((1, 1), 64, (64, 64)),
])
def test_resized_size(hw, size, expected):
    assert resized_size(*hw, size) == expected


def test_resized_size_caps_at_target_and_rejects_empty():
    assert resized_size(10, 40, 8) == (8, 8)  # min_size 14 > size 8: capped so the output stays square
    with pytest.raises(ValueError):
        resized_size(0, 10, 64)


def _content_box(out: torch.Tensor, fill) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the pixels that differ from the fill colour."""
    f = torch.tensor(fill, dtype=torch.float32).view(3, 1, 1) / 255
    diff = (out != f).any(0)
    rows, cols = diff.any(1).nonzero().flatten(), diff.any(0).nonzero().flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


@pytest.mark.parametrize("hw, size, box", [
    ((480, 640), 128, (16, 112, 0, 128)),   # 96 rows: 16 above, 16 below
    ((640, 480), 128, (0, 128, 16, 112)),
    ((100, 131), 128, (15, 112, 0, 128)),   # 97 rows: odd padding, 15 above, 16 below
    ((131, 100), 128, (0, 128, 15, 112)),
    ((90, 90), 128, (0, 128, 0, 128)),
])
def test_longer_side_scaled_and_centred(hw, size, box):
    img = torch.full((3, *hw), 255, dtype=torch.uint8)
    img[1] = 0  # magenta, far from the fill colour
    out = preprocess_image(img, size, CLIP_MEAN)
    assert out.shape == (3, size, size)
    assert _content_box(out, background_color(CLIP_MEAN)) == box
    top, bottom, left, right = box
    inner = out[:, top:bottom, left:right] * 255
    assert (inner[0] > 250).all() and (inner[1] < 5).all() and (inner[2] > 250).all()


def test_background_colour_exact():
    assert background_color(CLIP_MEAN) == (122, 116, 104)
    assert background_color(SIGLIP_MEAN) == (127, 127, 127)
    assert background_color(None) == (127, 127, 127)
    img = torch.zeros(3, 30, 60, dtype=torch.uint8)
    for mean, fill in [(CLIP_MEAN, (122, 116, 104)), (SIGLIP_MEAN, (127, 127, 127))]:
        u8 = resize_and_pad(img, 64, mean)
        assert u8.dtype == torch.uint8 and u8.shape == (3, 64, 64)
        f = torch.tensor(fill, dtype=torch.uint8).view(3, 1, 1)
        assert (u8[:, :16] == f).all() and (u8[:, 48:] == f).all()
        assert (u8[:, 16:48] == 0).all()  # a constant image stays constant through the resize
        out = preprocess_image(img, 64, mean)
        assert torch.equal(out[:, 0, 0], torch.tensor(fill, dtype=torch.float32) / 255)


def test_output_range_and_dtype():
    img = _t(_photo(77, 123, seed=3))
    for size in (64, 384):
        out = preprocess_image(img, size, CLIP_MEAN)
        assert out.dtype == torch.float32 and out.shape == (3, size, size)
        assert out.min() >= 0.0 and out.max() <= 1.0
        levels = out * 255
        assert torch.equal(levels, levels.round())  # uint8 values / 255
    assert img.dtype == torch.uint8 and img.shape == (3, 77, 123)  # input untouched
    with pytest.raises(TypeError):
        preprocess_image(img.float(), 64, CLIP_MEAN)
    with pytest.raises(ValueError):
        preprocess_image(img[:1], 64, CLIP_MEAN)


@pytest.mark.parametrize("hw, size", [((48, 80), 64), ((80, 48), 64), ((33, 33), 64), ((4, 300), 100),
                                      ((64, 64), 64), ((200, 90), 64)])
def test_float_output_equals_uint8_canvas_over_255(hw, size):
    img = _t(_photo(*hw, seed=5))
    for mean in (CLIP_MEAN, SIGLIP_MEAN, None):
        assert torch.equal(preprocess_image(img, size, mean), resize_and_pad(img, size, mean).float() / 255)


def test_no_resize_when_longer_side_matches():
    img = _t(_photo(64, 128, seed=1))
    out = resize_and_pad(img, 128, SIGLIP_MEAN)
    assert torch.equal(out[:, 32:96], img)  # values exact: only padding
    sq = _t(_photo(96, 96, seed=2))
    assert torch.equal(preprocess_image(sq, 96, CLIP_MEAN), sq.float() / 255)


def test_pad_to_square_target_side():
    img = torch.full((3, 2, 5), 9, dtype=torch.uint8)
    out = pad_to_square(img, (1, 2, 3), size=7)
    assert out.shape == (3, 7, 7) and (out[:, 2:4, 1:6] == 9).all()
    assert (out[:, 0] == torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1)).all()
    assert pad_to_square(img, (0, 0, 0)).shape == (3, 5, 5)
    with pytest.raises(ValueError):
        pad_to_square(img, (0, 0, 0), size=4)


# ------------------------------------------------------------------------------------------------ vs the official code


@pytest.mark.parametrize("hw, size, mean", [
    ((480, 640), 1024, CLIP_MEAN),    # the 7B hybrid's SAM input, upscale
    ((640, 480), 1024, CLIP_MEAN),
    ((300, 300), 1024, CLIP_MEAN),
    ((1200, 1600), 1024, CLIP_MEAN),  # downscale
    ((480, 640), 384, SIGLIP_MEAN),   # the 1.3B
    ((333, 500), 384, SIGLIP_MEAN),
])
def test_matches_official_processor(hw, size, mean):
    arr = _photo(*hw, seed=hw[0])
    ref = _official(arr, size, mean)
    ours = preprocess_image(_t(arr), size, mean)
    assert ours.shape == ref.shape
    d = _levels(ours, ref)
    # measured (torch 2.11 / 2.13 / 2.14 CPU): mean <= 0.01 levels, max 2, >= 99 % of pixels identical
    assert d.mean() < 0.05 and d.max() <= 3, (d.mean(), d.max())
    assert (d == 0).mean() > 0.98


@pytest.mark.parametrize("hw, size", [((20, 1000), 384), ((1000, 5), 1024), ((3, 400), 64)])
def test_min_size_rule_extreme_aspect(hw, size):
    arr = _photo(max(hw[0], 32), max(hw[1], 32), seed=7)[:hw[0], :hw[1]]
    ref = _official(arr, size, CLIP_MEAN)
    ours = preprocess_image(_t(arr), size, CLIP_MEAN)
    assert ours.shape == ref.shape == (3, size, size)
    d = _levels(ours, ref)
    assert d.mean() < 0.05 and d.max() <= 3, (d.mean(), d.max())
    nh, nw = resized_size(*hw, size)
    assert min(nh, nw) == 14
    fill = torch.tensor(background_color(CLIP_MEAN), dtype=torch.float32).view(3, 1, 1) / 255
    if nh == 14:
        top = (size - 14) // 2
        assert torch.equal(ours[:, :top], fill.expand(3, top, size))
        assert torch.equal(ours[:, top + 14:], fill.expand(3, size - top - 14, size))
    else:
        left = (size - 14) // 2
        assert torch.equal(ours[:, :, :left], fill.expand(3, size, left))
        assert torch.equal(ours[:, :, left + 14:], fill.expand(3, size, size - left - 14))


def test_float_fallback_close_to_official(monkeypatch):
    """Without a native uint8 kernel (other devices, old torch) the resize runs in float32, rounded back."""
    real = pp.F.interpolate
    calls = {"u8": 0, "f32": 0}

    def no_uint8(x, *args, **kwargs):
        if x.dtype == torch.uint8:
            calls["u8"] += 1
            raise RuntimeError("\"upsample_bicubic2d_aa\" not implemented for 'Byte'")
        calls["f32"] += 1
        return real(x, *args, **kwargs)

    monkeypatch.setattr(pp.F, "interpolate", no_uint8)
    arr = _photo(480, 640, seed=11)
    ours = preprocess_image(_t(arr), 1024, CLIP_MEAN)
    assert calls == {"u8": 1, "f32": 1}
    d = _levels(ours, _official(arr, 1024, CLIP_MEAN))
    # measured: mean 0.22 levels, max 4 on photo-like images (up to 23 on pure noise: PIL clips between passes)
    assert d.mean() < 1.5 and d.max() <= 8, (d.mean(), d.max())


@pytest.mark.parametrize("kind", ["rgb_420", "rgb_444", "progressive", "grey", "cmyk", "png"])
def test_decode_image_fast_jpeg_path_equals_pil(kind, monkeypatch):
    """JPEGs decoded by torchvision give PIL's pixels exactly; other formats and modes take PIL's path."""
    import io

    from vlpretrain.data import preprocess, shards

    rng = np.random.default_rng(3)
    base = np.clip(rng.normal(128, 60, (61, 83, 3)).cumsum(1) / 20 + 60, 0, 255).astype(np.uint8)
    img = Image.fromarray(base)
    buf = io.BytesIO()
    if kind == "grey":
        img.convert("L").save(buf, "JPEG", quality=85)
    elif kind == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=85)
    elif kind == "png":
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=85, subsampling=2 if kind == "rgb_420" else 0,
                 progressive=kind == "progressive")
    raw = buf.getvalue()
    calls = []
    real = preprocess._decode_jpeg
    monkeypatch.setattr(preprocess, "_decode_jpeg", lambda r: calls.append(1) or real(r))
    fast = preprocess.decode_image(raw)
    with Image.open(io.BytesIO(raw)) as im:
        ref = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    assert fast.dtype == torch.uint8 and fast.shape == (3, 61, 83)
    assert torch.equal(fast, ref)
    assert bool(calls) == (kind not in ("cmyk", "png"))
    with pytest.raises(shards.BadSample, match="undecodable"):
        preprocess.decode_image(raw[: len(raw) // 2] if kind != "png" else b"\x89PNG broken")


# ---- bit depth, pixel budget, Pillow's warnings (decode_image / load_image)

def _png_bytes(arr: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _flat_png(w: int, h: int) -> bytes:
    """A w x h 8-bit grey PNG of one colour, written row by row (small file, nothing of w x h in memory)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z, row, parts = zlib.compressobj(9), b"\x00" + b"\x75" * w, []
    for _ in range(h):
        parts.append(z.compress(row))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def test_16bit_grey_png_scaled_not_saturated(tmp_path):
    """A 16-bit grey PNG (Pillow's I;16) used to go through convert("RGB"), which clips: mean ~254 instead of
    the image's ~128. Now v / 257, rounded: exactly the 8-bit values it was made of."""
    a8 = np.random.default_rng(0).integers(0, 256, (64, 80)).astype(np.uint16)
    raw = _png_bytes(a8 * 257)
    import io
    with Image.open(io.BytesIO(raw)) as im:
        assert im.mode == "I;16"
        assert np.asarray(im.convert("RGB")).mean() > 250  # what the old decode gave (measured 253.95)
    img = pp.decode_image(raw)
    assert img.dtype == torch.uint8 and img.shape == (3, 64, 80)
    assert abs(img.float().mean().item() - a8.mean()) < 1e-3  # 127.76
    assert all(torch.equal(img[c], torch.from_numpy(a8.astype(np.uint8))) for c in range(3))
    (tmp_path / "g16.png").write_bytes(raw)
    assert torch.equal(pp.load_image(tmp_path / "g16.png"), img)
    # not a multiple of 257: rounded to the nearest level
    half = pp.decode_image(_png_bytes(np.array([[0, 128, 129, 385, 65535]], dtype=np.uint16)))
    assert half[0, 0].tolist() == [0, 0, 1, 1, 255]


def test_high_bit_depth_modes_by_range():
    """I;16B, a 12-bit TIFF (BitsPerSample 12), 32-bit I without a stated depth, float F."""
    a8 = np.arange(0, 256, 5, dtype=np.uint16).reshape(4, 13)
    big = Image.frombytes("I;16B", (13, 4), (a8 * 257).astype(">u2").tobytes())
    assert pp._grey_to_uint8(big).tolist() == a8.tolist()
    # mode I from an array: no file format, so the real range decides (<= 65535: 16 bits)
    assert pp._grey_to_uint8(Image.fromarray((a8 * 257).astype(np.int32))).tolist() == a8.tolist()
    assert pp._grey_to_uint8(Image.fromarray(a8.astype(np.int32))).tolist() == a8.tolist()  # 8-bit values
    f = Image.fromarray((a8 / 255).astype(np.float32))
    assert f.mode == "F" and pp._grey_to_uint8(f).tolist() == a8.tolist()
    # a 12-bit TIFF read as mode I (BitsPerSample 12): scaled by 4095, not by its range or 65535 (near black)
    a12 = (a8.astype(np.int64) * 4095 + 127) // 255
    im = Image.fromarray(a12.astype(np.int32))
    im.tag_v2 = {258: (12,)}
    assert pp._grey_to_uint8(im).tolist() == a8.tolist()


def test_png_over_pixel_budget_skipped_before_decoding():
    """A 12000x12000 PNG of one colour (a ~150 KB file, 432 MB of RGB) is a BadSample naming its size and the
    key, decided from the header: it used to cost 1.9 GB peak (measured) and ~6 s; now ~0 MB and milliseconds.
    Measured in a fresh process (ru_maxrss is a process peak)."""
    from tests.conftest import run_script_ok
    run_script_ok("""
import resource, time
from tests.test_preprocess import _flat_png
from vlpretrain.data.preprocess import decode_image
from vlpretrain.data.shards import BadSample
raw = _flat_png(12000, 12000)
assert len(raw) < 1_000_000, len(raw)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
try:
    decode_image(raw, "s.tar", "k")
    raise SystemExit("decoded")
except BadSample as e:
    msg = str(e)
dt, grew = time.perf_counter() - t0, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) / 1024
assert "12000x12000" in msg and "data.max_image_pixels=67108864" in msg and "'k'" in msg, msg
assert grew < 200 and dt < 2, (grew, dt)
print("ok")
""")


def test_pixel_budget_jpeg_decoded_at_reduced_size(monkeypatch):
    """A JPEG over the budget: libjpeg's scaled decode (draft), the smallest reduction that fits, PIL's pixels
    of that draft; a note (reported once per source by the loader). Too big even at 1/8: a BadSample."""
    import io

    from vlpretrain.data.shards import BadSample
    arr = _photo(600, 800, seed=5)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    raw = buf.getvalue()
    monkeypatch.setattr(pp, "_decode_jpeg", lambda r: pytest.fail("full-size decode"))
    with pp.decoding(max_pixels=200_000) as notes:  # 480000 px: 1/2 (120000) fits
        got = pp.decode_image(raw)
    assert got.shape == (3, 300, 400)
    with Image.open(io.BytesIO(raw)) as im:
        im.draft("RGB", (400, 300))
        ref = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(got, ref)
    assert [k for k, _ in notes] == ["reduced"] and "800x600" in notes[0][1] and "400x300" in notes[0][1]
    with pp.decoding(max_pixels=20_000) as notes:  # 1/8 = 100x75 = 7500
        assert pp.decode_image(raw).shape == (3, 75, 100)
    with pp.decoding(max_pixels=5_000), pytest.raises(BadSample, match="even at 1/8 scale"):
        pp.decode_image(raw)
    with pp.decoding(max_pixels=0):  # no budget: the full image (PIL's path here: _decode_jpeg is patched away)
        monkeypatch.setattr(pp, "_decode_jpeg", lambda r: None)
        assert pp.decode_image(raw).shape == (3, 600, 800)
    assert pp._SCOPE.get() is None  # the scope is not leaked


def test_pil_warnings_reported_once_per_source_not_raw(monkeypatch, caplog):
    """Pillow's DecompressionBombWarning (here: its limit lowered for the test) is not printed raw at every
    draw: the loader logs it once per source; the warnings filters are left as they were."""
    import logging
    import warnings
    from types import SimpleNamespace

    from vlpretrain.data.loader import DataPipeline

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 = 1600 px: a warning (an error above 2000)
    raw = _png_bytes(np.full((40, 40, 3), 90, np.uint8))

    class Src:
        def __init__(self, name):
            self.name = name

        def key(self, i):
            return f"{self.name}/{i}"

        def image(self, i, j, record):
            return pp.decode_image(raw)

    pipe = DataPipeline.__new__(DataPipeline)
    pipe.cfg = SimpleNamespace(data=SimpleNamespace(max_image_pixels=pp.DEFAULT_MAX_IMAGE_PIXELS))
    pipe.plans = SimpleNamespace(sources=[Src("a"), Src("b")])
    pipe.image_size, pipe.pad_mean = 64, CLIP_MEAN
    pipe._warned_images, pipe._warned_decode = set(), set()
    filters = list(warnings.filters)
    counter = [0, 0]
    with warnings.catch_warnings(record=True) as raw_warnings, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        for step in range(5):
            for src in (0, 1):
                out = pipe._image(SimpleNamespace(source=src, index=step), 0, {}, counter)
                assert out.shape == (3, 64, 64)
    assert not [w for w in raw_warnings if issubclass(w.category, Image.DecompressionBombWarning)]
    lines = [r.getMessage() for r in caplog.records if "DecompressionBombWarning" in r.getMessage()]
    assert len(lines) == 2 and "a/0" in lines[0] and "b/0" in lines[1], lines
    assert counter == [0, 0] and warnings.filters == filters
    # outside a loader (eval, tools): logged once per process, never raw
    monkeypatch.setattr(pp, "_logged", set())
    caplog.clear()
    with warnings.catch_warnings(record=True) as raw_warnings, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        for _ in range(3):
            pp.decode_image(raw)
    assert not raw_warnings
    assert len([r for r in caplog.records if "DecompressionBombWarning" in r.getMessage()]) == 1


def test_budget_default_is_the_config_default():
    from vlpretrain.config.schema import DataConfig
    assert DataConfig().max_image_pixels == pp.DEFAULT_MAX_IMAGE_PIXELS
