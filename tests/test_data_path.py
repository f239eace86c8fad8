"""Data path: sample encoding (placeholders, labels, SFT masking, truncation), the modality schedule and image
preprocessing. The step pipeline itself is tested in test_data_pipeline.py."""
from __future__ import annotations

import math

import pytest
import torch

from vlpretrain.config import LanguageRatioConfig
from vlpretrain.data.encoding import IGNORE, SampleEncoder
from vlpretrain.data.preprocess import load_image, pad_to_square, preprocess_image
from vlpretrain.data.sample_order import ModalitySchedule
from vlpretrain.data.tokenizer import BOS, EOS, IMAGE

T = 4  # image tokens per image in the encoder tests (the tiny model uses 36)


def _expected(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """ids / supervision flags for (text, supervised) pieces; IMAGE pieces become T image ids."""
    ids, sup = [tok.bos_id], [False]
    for text, s in pieces:
        if text == IMAGE:
            ids += [tok.image_id] * T
            sup += [False] * T
        elif text == EOS:
            ids.append(tok.eos_id)
            sup.append(s)
        else:
            enc = tok.encode(text)
            ids += enc
            sup += [s] * len(enc)
    return ids, sup


def _labels(ids: list[int], sup: list[bool]) -> list[int]:
    return [t if s else IGNORE for t, s in zip(ids[1:], sup[1:])]


def _runs(tokens: list[int], image_id: int) -> list[int]:
    """Lengths of the consecutive runs of ``image_id``."""
    runs, n = [], 0
    for t in tokens + [None]:
        if t == image_id:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


# ---------------------------------------------------------------------------------------------------------------
# SampleEncoder


def test_special_token_ids(tokenizer, tiny_cfg):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.image_id, tokenizer.pad_id) == (0, 1, 2, 3)
    assert tokenizer.image_id == tiny_cfg.model.image_token_id
    assert tokenizer.encode(IMAGE) == [tokenizer.image_id]


def test_encode_text_with_images(tokenizer):
    enc = SampleEncoder(tokenizer, T, seq_len=64)
    rec = {"text": "A cat sat. <image_placeholder> It is red. <image_placeholder> The end.",
           "images": ["a.png", "b.png"]}
    s = enc.encode(rec)
    ids, sup = _expected(tokenizer, [("A cat sat. ", True), (IMAGE, False), (" It is red. ", True),
                                     (IMAGE, False), (" The end.", True), (EOS, True)])
    assert s.tokens == ids[:-1]
    assert s.labels == _labels(ids, sup)
    assert s.images == ["a.png", "b.png"]
    assert len(s.tokens) == len(s.labels)
    # every placeholder became exactly T image ids
    assert s.tokens.count(tokenizer.image_id) == 2 * T and _runs(s.tokens, tokenizer.image_id) == [T, T]
    # labels are the next tokens, and no target is an image token
    for i, lab in enumerate(s.labels):
        nxt = ids[i + 1]
        assert lab == (IGNORE if nxt == tokenizer.image_id else nxt)
    assert tokenizer.image_id not in s.labels
    assert s.labels[-1] == tokenizer.eos_id and s.tokens[0] == tokenizer.bos_id
    # the position right after an image run predicts text: it is supervised
    after = s.tokens.index(tokenizer.image_id) + T - 1
    assert s.labels[after] == ids[after + 1] != IGNORE


def test_sft_masks_everything_but_answers(tokenizer):
    enc = SampleEncoder(tokenizer, T, seq_len=200)
    rec = {"images": ["x.png"], "conversation": [
        {"role": "User", "content": "<image_placeholder>\nWhat colour is the circle?"},
        {"role": "Assistant", "content": "It is red."},
        {"role": "User", "content": "And the square?"},
        {"role": "Assistant", "content": "Blue."}]}
    s = enc.encode(rec)
    full = s.tokens + [s.labels[-1]]
    assert tokenizer.decode(full) == (
        BOS + "User: " + IMAGE * T + "\nWhat colour is the circle?\n\nAssistant: It is red." + EOS
        + "User: And the square?\n\nAssistant: Blue." + EOS)
    ids, sup = _expected(tokenizer, [
        ("User: ", False), (IMAGE, False), ("\nWhat colour is the circle?\n\n", False),
        ("Assistant: ", False), ("It is red.", True), (EOS, True),
        ("User: And the square?\n\n", False), ("Assistant: ", False), ("Blue.", True), (EOS, True)])
    # the encoder tokenises each turn's text pieces separately (split at placeholders, "Assistant: " apart)
    assert s.tokens == ids[:-1]
    assert s.labels == _labels(ids, sup)
    sup_text = tokenizer.decode([t for t in s.labels if t != IGNORE])
    assert sup_text == "It is red." + EOS + "Blue." + EOS
    # supervised label positions are exactly the answer tokens and the eos after each answer
    answer_ids = tokenizer.encode("It is red.") + [tokenizer.eos_id] + tokenizer.encode("Blue.") + [tokenizer.eos_id]
    assert [t for t in s.labels if t != IGNORE] == answer_ids
    assert s.images == ["x.png"]
    assert sum(1 for t in s.labels if t != IGNORE) == len(answer_ids)
    # the "Assistant: " prefix is not supervised: the first supervised target follows it
    first = next(i for i, t in enumerate(s.labels) if t != IGNORE)
    assert tokenizer.decode(full[:first + 1]).endswith("Assistant: ")


def test_sft_exact_chat_string_and_system_prompt(tokenizer):
    enc = SampleEncoder(tokenizer, T, seq_len=200, system_prompt="You are helpful.")
    s = enc.encode({"conversation": [{"role": "User", "content": "Hi"}, {"role": "Assistant", "content": "Hello!"}]})
    chat = BOS + "You are helpful.\n\nUser: Hi\n\nAssistant: Hello!" + EOS
    assert tokenizer.decode(s.tokens + [s.labels[-1]]) == chat
    assert tokenizer.decode([t for t in s.labels if t != IGNORE]) == "Hello!" + EOS
    assert s.images == []


def test_truncation_never_cuts_an_image_run(tokenizer):
    text = "Intro words here. <image_placeholder> middle text between. <image_placeholder> and more words after."
    full = SampleEncoder(tokenizer, T, seq_len=500).encode({"text": text, "images": ["a", "b"]})
    n_full = len(full.tokens) + 1  # ids incl. the final target
    img = tokenizer.image_id
    starts = [i for i, t in enumerate(full.tokens) if t == img and full.tokens[i - 1] != img]
    assert len(starts) == 2
    seen_counts = set()
    for seq_len in range(3, n_full + 2):
        enc = SampleEncoder(tokenizer, T, seq_len=seq_len)
        s = enc.encode({"text": text, "images": ["a", "b"]})
        assert len(s.tokens) <= seq_len and len(s.labels) == len(s.tokens)
        runs = _runs(s.tokens, img)
        assert all(r == T for r in runs), (seq_len, runs)
        assert len(runs) == len(s.images), seq_len
        assert s.images == ["a", "b"][:len(runs)]
        assert img not in s.labels
        # the kept prefix is the untruncated prefix
        assert s.tokens == full.tokens[:len(s.tokens)]
        assert s.labels == full.labels[:len(s.labels)]
        # an image is kept exactly when its whole run fits as inputs (positions < seq_len)
        assert len(runs) == sum(1 for st in starts if st + T <= seq_len), seq_len
        seen_counts.add(len(runs))
    assert seen_counts == {0, 1, 2}
    # a concrete cut inside the second image run: the whole second image is dropped
    cut = starts[1] + 2
    s = SampleEncoder(tokenizer, T, seq_len=cut).encode({"text": text, "images": ["a", "b"]})
    # the ids end just before the second run; the last kept id is only a target
    assert s.images == ["a"] and s.tokens == full.tokens[:starts[1] - 1]
    assert s.labels[-1] == full.tokens[starts[1] - 1] and len(s.tokens) < cut


def test_truncation_keeps_adjacent_images(tokenizer):
    text = IMAGE + IMAGE + " hello world" * 40
    s = SampleEncoder(tokenizer, T, seq_len=20).encode({"text": text, "images": ["a", "b"]})
    assert s.tokens.count(tokenizer.image_id) == 2 * T
    assert s.images == ["a", "b"]


@pytest.mark.parametrize("rec", [
    {"text": ""},
    {"text": "   \n"},
    {},
    {"text": IMAGE, "images": ["a.png"]},
    {"text": IMAGE + " " + IMAGE, "images": ["a.png", "b.png"]},
], ids=["empty", "blank", "no-text-key", "only-placeholder", "two-placeholders"])
def test_sample_without_text_raises(tokenizer, rec):
    with pytest.raises(ValueError, match="without text"):
        SampleEncoder(tokenizer, T, seq_len=64).encode(rec)


@pytest.mark.parametrize("rec", [
    {"text": "one " + IMAGE, "images": []},
    {"text": "none", "images": ["a.png"]},
    {"conversation": [{"role": "User", "content": "hi"}]},
    {"conversation": []},
    {"conversation": [{"role": "Robot", "content": "hi"}, {"role": "Assistant", "content": "x"}]},
], ids=["placeholder-without-image", "image-without-placeholder", "no-assistant", "empty-conv", "bad-role"])
def test_unusable_samples_raise(tokenizer, rec):
    with pytest.raises(ValueError):
        SampleEncoder(tokenizer, T, seq_len=64).encode(rec)


# ---------------------------------------------------------------------------------------------------------------
# ModalitySchedule


@pytest.mark.parametrize("shape, step, expected", [
    ("linear", 1, 1.0), ("linear", 26, 0.925), ("linear", 51, 0.85), ("linear", 76, 0.775), ("linear", 101, 0.7),
    ("linear", 5000, 0.7),
    ("cosine", 1, 1.0), ("cosine", 26, 1.0 - 0.3 * 0.5 * (1 - math.sqrt(0.5))), ("cosine", 51, 0.85),
    ("cosine", 76, 0.7 + 0.3 * 0.5 * (1 - math.sqrt(0.5))), ("cosine", 101, 0.7), ("cosine", 300, 0.7),
    ("step", 1, 1.0), ("step", 100, 1.0), ("step", 101, 0.7), ("step", 102, 0.7),
])
def test_schedule_ratio_values(shape, step, expected):
    sched = ModalitySchedule(LanguageRatioConfig(start=1.0, end=0.7, warmup_steps=100, shape=shape))
    assert sched.ratio(step) == pytest.approx(expected, rel=0, abs=1e-12)


def test_schedule_ratio_exact_numbers():
    lin = ModalitySchedule(LanguageRatioConfig(start=1.0, end=0.7, warmup_steps=4000, shape="linear"))
    assert lin.ratio(2001) == pytest.approx(0.85, abs=1e-12)
    assert lin.ratio(1001) == pytest.approx(0.925, abs=1e-12)
    cos = ModalitySchedule(LanguageRatioConfig(start=1.0, end=0.7, warmup_steps=100, shape="cosine"))
    assert cos.ratio(26) == pytest.approx(0.9560660171779821, abs=1e-12)
    up = ModalitySchedule(LanguageRatioConfig(start=0.2, end=0.6, warmup_steps=10, shape="linear"))
    assert up.ratio(6) == pytest.approx(0.4, abs=1e-12)
    flat = ModalitySchedule(LanguageRatioConfig(start=1.0, end=0.7, warmup_steps=0))
    assert [flat.ratio(s) for s in (1, 2, 1000)] == [0.7, 0.7, 0.7]


@pytest.mark.parametrize("lr_cfg", [
    LanguageRatioConfig(start=1.0, end=0.7, warmup_steps=4000, shape="linear"),
    LanguageRatioConfig(start=1.0, end=0.7, warmup_steps=1000, shape="cosine"),
    LanguageRatioConfig(start=0.1, end=0.9, warmup_steps=2500, shape="step"),
    LanguageRatioConfig(start=1.0, end=0.37, warmup_steps=0),
    LanguageRatioConfig(start=0.0, end=0.0, warmup_steps=10),
], ids=["linear", "cosine", "step", "flat", "zero"])
def test_schedule_language_steps_track_the_target(lr_cfg):
    sched = ModalitySchedule(lr_cfg)
    cum, lang, worst = 0.0, 0, 0.0
    for step in range(1, 5001):
        cum += sched.ratio(step)
        lang += sched.is_language(step)
        worst = max(worst, abs(lang - cum))
        assert abs(lang - cum) < 1.0, (step, lang, cum)
    assert sched.realized(5000) == lang / 5000
    assert worst <= 0.5 + 1e-9  # the implementation rounds the cumulative target
    if lr_cfg.start == lr_cfg.end == 0.0:
        assert lang == 0
    # deterministic: a fresh schedule makes the same choices
    again = ModalitySchedule(lr_cfg)
    assert [again.is_language(s) for s in range(1, 200)] == [sched.is_language(s) for s in range(1, 200)]


# ---------------------------------------------------------------------------------------------------------------
# preprocessing


def test_pad_to_square_centres_with_fill():
    img = torch.full((3, 2, 4), 200, dtype=torch.uint8)
    out = pad_to_square(img, (10, 20, 30))
    assert out.shape == (3, 4, 4) and out.dtype == torch.uint8
    fill = torch.tensor([10, 20, 30], dtype=torch.uint8).view(3, 1, 1)
    assert (out[:, 1:3] == 200).all()
    assert (out[:, [0, 3]] == fill).all()
    # tall image, odd difference: 3 columns of fill split 1 left / 2 right
    img = torch.arange(12, dtype=torch.uint8).view(3, 4, 1) + 100
    out = pad_to_square(img, (1, 2, 3))
    assert out.shape == (3, 4, 4)
    assert torch.equal(out[:, :, 1:2], img)
    assert (out[:, :, [0, 2, 3]] == torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1)).all()
    sq = torch.zeros(3, 5, 5, dtype=torch.uint8)
    assert torch.equal(pad_to_square(sq, (9, 9, 9)), sq)


def test_preprocess_image_pads_with_mean_and_scales(tiny_cfg):
    mean = tiny_cfg.model.sam.mean  # CLIP mean: int(m * 255) = (122, 116, 104)
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 64, 128), generator=g, dtype=torch.uint8)
    out = preprocess_image(img, 128, mean)  # pads to 128 x 128: no resize, so values are exact
    assert out.shape == (3, 128, 128) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    fill = torch.tensor([122, 116, 104], dtype=torch.float32).view(3, 1, 1) / 255
    assert torch.equal(out[:, :32], fill.expand(3, 32, 128))
    assert torch.equal(out[:, 96:], fill.expand(3, 32, 128))
    assert torch.equal(out[:, 32:96], img.float() / 255)
    # with resizing: size and range, a constant image stays constant
    big = torch.randint(0, 256, (3, 50, 30), generator=g, dtype=torch.uint8)
    out = preprocess_image(big, 64, [0.5, 0.5, 0.5])
    assert out.shape == (3, 64, 64) and out.min() >= 0 and out.max() <= 1
    const = torch.full((3, 40, 60), 127, dtype=torch.uint8)
    out = preprocess_image(const, 128, [0.5, 0.5, 0.5])  # fill int(0.5 * 255) = 127
    assert out.shape == (3, 128, 128)
    torch.testing.assert_close(out, torch.full_like(out, 127 / 255), atol=1 / 255, rtol=0)


def test_load_demo_image(demo_dir):
    img = load_image(demo_dir / "images" / "shape_00000.png")
    assert img.shape == (3, 128, 128) and img.dtype == torch.uint8
