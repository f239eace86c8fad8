"""Byte-level BPE tokenizer for the demo data.

The special tokens come first so their ids are fixed (0..3) whatever the
corpus is; the library can rely on these ids. No post-processor is set:
the library adds bos/eos itself where it wants them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from vlpretrain.data.special_tokens import SPECIAL_TOKENS

if TYPE_CHECKING:  # keep `import data_tools` light; tokenizers is imported lazily
    from tokenizers import Tokenizer

SPECIAL_TOKEN_IDS: dict[str, int] = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
IMAGE_PLACEHOLDER = SPECIAL_TOKENS["image"]
DEFAULT_VOCAB_SIZE = 2048
TOKENIZER_FILE = "tokenizer.json"
# The held-out eval set is deliberately not used for tokenizer training.
TRAINING_FILES = ("captions.jsonl", "ocr.jsonl", "interleaved.jsonl", "text.jsonl", "sft.jsonl")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts` and save it atomically to `out_path`.

    Texts are split at image placeholders, the way encoding splits them off as
    special tokens, so no merge ever spans a placeholder.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        # All 256 byte symbols, so any input is encodable without an unk token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    segments = (part for text in texts for part in text.split(IMAGE_PLACEHOLDER) if part)
    tokenizer.train_from_iterator(segments, trainer=trainer)

    for name, token in SPECIAL_TOKENS.items():
        got = tokenizer.token_to_id(token)
        if got != SPECIAL_TOKEN_IDS[name]:
            raise RuntimeError(f"special token {token!r} got id {got}, expected {SPECIAL_TOKEN_IDS[name]}")

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, out_path)
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved by `train_tokenizer` (a file, or a demo data directory)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    return Tokenizer.from_file(str(path))


def iter_training_texts(data_dir: str | os.PathLike) -> Iterator[str]:
    """Yield every training text of a demo data directory, in a fixed order.

    Covers captions, ocr, interleaved and text samples plus every sft turn
    (questions and answers). Missing files are skipped.
    """
    data_dir = Path(data_dir)
    for name in TRAINING_FILES:
        path = data_dir / name
        if not path.exists():
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                sample = json.loads(line)
                if "text" in sample:
                    yield sample["text"]
                for turn in sample.get("conversation", ()):
                    yield turn["content"]


def train_from_dir(data_dir: str | os.PathLike, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """(Re)train the tokenizer on a demo data directory and write DIR/tokenizer.json.

    If DIR/manifest.json exists its `vocab_size` is updated to match.
    """
    data_dir = Path(data_dir)
    tokenizer = train_tokenizer(iter_training_texts(data_dir), vocab_size, data_dir / TOKENIZER_FILE)
    manifest_path = data_dir / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        manifest["vocab_size"] = tokenizer.get_vocab_size()
        tmp = manifest_path.with_name(".manifest.json.tmp")
        tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, manifest_path)
    return tokenizer
