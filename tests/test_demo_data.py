"""Tests for the deterministic demo dataset and its tokenizer (data_tools)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_tools import IMAGE_PLACEHOLDER, SPECIAL_TOKENS, generate_demo, load_tokenizer
from data_tools.__main__ import main as cli_main

SMALL = 0.05
TRAIN_FILES = ("captions.jsonl", "ocr.jsonl", "interleaved.jsonl", "text.jsonl", "sft.jsonl")


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(root: Path, name: str) -> list[dict]:
    with open(root / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo_a")
    generate_demo(out, seed=0, scale=SMALL, verbose=False)
    return out


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Large enough for 100 eval questions and the full-size statistics.
    out = tmp_path_factory.mktemp("demo_medium")
    generate_demo(out, seed=0, scale=0.5, verbose=False)
    return out


def test_deterministic(demo: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_demo(again, seed=0, scale=SMALL, verbose=False)
    assert _hashes(again) == _hashes(demo)

    other = tmp_path / "other"
    generate_demo(other, seed=1, scale=SMALL, verbose=False)
    other_hashes, base = _hashes(other), _hashes(demo)
    assert other_hashes.keys() == base.keys()
    for name in ("captions.jsonl", "sft.jsonl", "eval_mc.jsonl", "images/shape_00000.png"):
        assert other_hashes[name] != base[name], name


def test_manifest(demo: Path) -> None:
    manifest = json.loads((demo / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["seed"] == 0 and manifest["scale"] == SMALL and manifest["image_size"] == 128
    assert manifest["special_tokens"] == SPECIAL_TOKENS
    for name, count in manifest["files"].items():
        assert len(_rows(demo, name)) == count > 0
    assert not list(demo.rglob(".*.tmp"))


def test_placeholders_match_images(demo: Path) -> None:
    seen: set[str] = set()
    for name in (*TRAIN_FILES, "eval_mc.jsonl"):
        for row in _rows(demo, name):
            images = row.get("images", [])
            if "conversation" in row:
                text = "".join(turn["content"] for turn in row["conversation"])
                roles = [turn["role"] for turn in row["conversation"]]
                assert roles == ["User", "Assistant"] * (len(roles) // 2) and roles
            else:
                text = row.get("text", row.get("question", ""))
            assert text.count(IMAGE_PLACEHOLDER) == len(images), row["id"]
            if row.get("kind") == "interleaved":
                assert 2 <= len(images) <= 3
            seen.update(images)
    assert seen
    for rel in seen:
        with Image.open(demo / rel) as image:
            assert image.size == (128, 128) and image.mode == "RGB", rel


def test_eval_is_held_out_and_well_formed(medium: Path) -> None:
    rows = _rows(medium, "eval_mc.jsonl")
    assert len(rows) >= 100
    train_images = {p for name in TRAIN_FILES for row in _rows(medium, name) for p in row.get("images", [])}
    sft_answers = {turn["content"] for row in _rows(medium, "sft.jsonl")
                   for turn in row["conversation"] if turn["role"] == "Assistant"}
    for row in rows:
        assert len(row["options"]) == 4 and len(set(row["options"])) == 4
        assert 0 <= row["answer"] < 4
        assert not set(row["images"]) & train_images
        # Options use exactly the sft answer forms, so likelihood scoring is in-distribution.
        assert set(row["options"]) <= sft_answers, row
    counts = Counter(row["answer"] for row in rows)
    for index in range(4):
        assert 0.15 <= counts[index] / len(rows) <= 0.35, counts
    types = Counter(row["type"] for row in rows)
    assert set(types) <= {"colour", "shape", "position", "tallest_bar"}
    assert types["colour"] + types["shape"] + types["position"] > types["tallest_bar"] > 0


def test_eval_types_balanced_and_bar_answers_unambiguous(medium: Path) -> None:
    # Every question type is measured on as many items (issue 16: 20 tallest-bar items were too few to tell).
    types = Counter(row["type"] for row in _rows(medium, "eval_mc.jsonl"))
    assert len(types) == 4 and max(types.values()) - min(types.values()) <= 1, types
    # A "Bar X." answer only ever answers "which bar is the tallest" (or "has the largest value"): with
    # "shortest" asked about the same charts in the same answer form, the tiny model learned neither.
    n_bar = 0
    for row in _rows(medium, "sft.jsonl"):
        turns = row["conversation"]
        for question, answer in zip(turns[::2], turns[1::2]):
            if answer["content"].startswith("Bar "):
                n_bar += 1
                assert "tallest" in question["content"] or "largest value" in question["content"], row
    assert n_bar >= 200, n_bar


def test_shape_answers_only_answer_the_one_shape_question(medium: Path) -> None:
    # "Circle." answers only "what shape is shown?" about a one-shape image: a two-shape "what shape is in the
    # top left corner?" in the same answer form kept shape at 0.52 after stage 3 (0.66 without, issue 16).
    from data_tools.demo_images import SHAPES
    from data_tools.demo_texts import QUESTIONS

    shape_answers = {f"{s.capitalize()}." for s in SHAPES}
    n_shape = 0
    for row in _rows(medium, "sft.jsonl"):
        turns = row["conversation"]
        for question, answer in zip(turns[::2], turns[1::2]):
            if answer["content"] in shape_answers:
                n_shape += 1
                assert question["content"].split("\n")[-1] in QUESTIONS["shape"], row
                assert row["images"][0].split("/")[-1].startswith("shape_"), row
    assert n_shape >= 300, n_shape


def test_small_eval_answers_roughly_balanced(demo: Path) -> None:
    rows = _rows(demo, "eval_mc.jsonl")
    counts = Counter(row["answer"] for row in rows)
    assert max(counts.values()) - min(counts.get(i, 0) for i in range(4)) <= 1


def test_tokenizer(demo: Path) -> None:
    tokenizer = load_tokenizer(demo / "tokenizer.json")
    for expected_id, token in enumerate(SPECIAL_TOKENS.values()):
        assert tokenizer.token_to_id(token) == expected_id
    assert tokenizer.encode(IMAGE_PLACEHOLDER).ids == [2]
    ids = tokenizer.encode(f"Look: {IMAGE_PLACEHOLDER}\nWhat colour is the shape?").ids
    assert ids.count(2) == 1
    sentence = "The function returns a new list, unchanged.  Ünïcödé ✓ too!"
    assert tokenizer.decode(tokenizer.encode(sentence).ids) == sentence


def test_tokenizer_cli_retrains(demo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (*TRAIN_FILES, "manifest.json"):
        (copy / name).write_bytes((demo / name).read_bytes())
    assert cli_main(["tokenizer", "--data", str(copy), "--vocab-size", "512"]) == 0
    tokenizer = load_tokenizer(copy)
    assert tokenizer.get_vocab_size() == 512
    assert json.loads((copy / "manifest.json").read_text(encoding="utf-8"))["vocab_size"] == 512


def test_text_corpus_is_real_english(demo: Path, medium: Path) -> None:
    small = " ".join(row["text"] for row in _rows(demo, "text.jsonl"))
    assert "function" in small or "statement" in small
    rows = _rows(medium, "text.jsonl")
    assert len(rows) > 100
    assert all(100 <= len(row["text"]) <= 1600 for row in rows)
    text = " ".join(row["text"] for row in rows)
    for word in ("function", "the", "object", "value"):
        assert f" {word} " in text
