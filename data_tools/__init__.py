"""Demo data tools: a deterministic synthetic vision-language dataset and its BPE tokenizer.

    python -m data_tools demo --out DIR [--seed 0] [--scale 1.0]
    python -m data_tools tokenizer --data DIR [--vocab-size 2048]
"""

from .demo_corpus import text_chunks
from .demo_data import generate_demo
from .demo_images import IMAGE_SIZE
from .demo_texts import answer_text
from .tokenizer import (
    DEFAULT_VOCAB_SIZE,
    IMAGE_PLACEHOLDER,
    SPECIAL_TOKEN_IDS,
    SPECIAL_TOKENS,
    iter_training_texts,
    load_tokenizer,
    train_from_dir,
    train_tokenizer,
)

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "IMAGE_PLACEHOLDER",
    "IMAGE_SIZE",
    "SPECIAL_TOKENS",
    "SPECIAL_TOKEN_IDS",
    "answer_text",
    "generate_demo",
    "iter_training_texts",
    "load_tokenizer",
    "text_chunks",
    "train_from_dir",
    "train_tokenizer",
]
