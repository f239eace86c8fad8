"""Language evaluation on held-out text (``train.eval_text``): bits per byte and perplexity, the paper's
measures of how much language ability survives the multimodal share.

The set is a JSONL file (one ``{"text": ...}`` per line) or a Megatron ``.bin/.idx`` corpus prefix. Each
document is BOS + its tokens (+ EOS for JSONL), cut into rows of ``train.seq_len`` predictions without overlap;
bits per byte = summed NLL / ln 2 / the documents' UTF-8 bytes (a corpus's bytes are its decoded text's).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from vlpretrain.data.indexed import IndexedDataset
from vlpretrain.data.tokenizer import TextTokenizer
from vlpretrain.errors import UserError
from vlpretrain.eval.rows import EvalRow


def _is_corpus(path: Path) -> bool:
    return Path(f"{path}.idx").is_file() or path.suffix in (".bin", ".idx")


def read_documents(path: str | Path, tokenizer: TextTokenizer) -> list[tuple[list[int], int]]:
    """(token ids with BOS/EOS, UTF-8 bytes) per document; a bad file is a one-line ``UserError``."""
    path = Path(path)
    if _is_corpus(path):
        ds = IndexedDataset(path.with_suffix("") if path.suffix in (".bin", ".idx") else path)
        docs = []
        for j in range(ds.num_documents):
            ids = [int(t) for t in ds.document(j)]
            docs.append(([tokenizer.bos_id] + ids, len(tokenizer.decode(ids).encode("utf-8"))))
        return docs
    if not path.is_file():
        raise FileNotFoundError(f"eval text not found: {path}")
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
            if not isinstance(text, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise UserError(f"eval text {path}: line {n}: expected a JSON object with a 'text' string") from None
        docs.append(([tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id], len(text.encode("utf-8"))))
    if not docs:
        raise UserError(f"eval text {path}: no documents")
    return docs


def text_rows(docs: list[tuple[list[int], int]], seq_len: int) -> list[EvalRow]:
    rows = []
    for ids, _ in docs:
        for start in range(0, len(ids) - 1, seq_len):
            chunk = ids[start:start + seq_len + 1]
            rows.append(EvalRow(chunk[:-1], chunk[1:]))
    return rows


def text_metrics(docs: list[tuple[list[int], int]], scores: torch.Tensor) -> dict:
    nll, tokens = float(scores[:, 0].sum()), float(scores[:, 1].sum())
    n_bytes = sum(b for _, b in docs)
    return {"bits_per_byte": nll / math.log(2) / max(n_bytes, 1), "perplexity": math.exp(nll / max(tokens, 1)),
            "tokens": int(tokens), "bytes": n_bytes, "documents": len(docs)}
