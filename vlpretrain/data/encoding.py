"""Turn one sample (text with ``<image_placeholder>`` marks, or an SFT conversation) into model inputs.

Each placeholder becomes ``image_tokens`` copies of the image token id. Targets are next tokens; positions whose
target is an image token are ignored (loss on text only). SFT uses DeepSeek-VL's chat format
(``User: ...\\n\\nAssistant: ...<eos>``) and supervises only answers and the end-of-sentence token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlpretrain.data.tokenizer import IMAGE, TextTokenizer

IGNORE = -100


def count_labels(labels) -> int:
    """Supervised targets in a list or numpy array of labels."""
    if isinstance(labels, np.ndarray):
        return int(np.count_nonzero(labels != IGNORE))
    return sum(1 for x in labels if x != IGNORE)


class TokenIdError(ValueError):
    """A pre-tokenized sample holds an id outside the model's vocabulary (another tokenizer's corpus)."""


@dataclass
class EncodedSample:
    tokens: list[int]  # inputs, length <= seq_len
    labels: list[int]  # next-token targets, IGNORE where not supervised (numpy arrays for corpus chunks)
    images: list[str]  # image paths in placeholder order (only those that fit)


class SampleEncoder:
    def __init__(self, tokenizer: TextTokenizer, image_tokens: int, seq_len: int, system_prompt: str = "",
                 truncate: bool = True, vocab_size: int | None = None):
        self.tok = tokenizer
        self.image_tokens = image_tokens
        self.seq_len = seq_len
        self.system_prompt = system_prompt
        self.truncate = truncate  # False: a sample longer than seq_len is rejected (ValueError), not cut
        self.vocab_size = vocab_size  # set: pre-tokenized ids must be below it (else TokenIdError)

    def _text_with_images(self, text: str, supervised: bool) -> tuple[list[int], list[bool], int]:
        ids: list[int] = []
        sup: list[bool] = []
        pieces = text.split(IMAGE)
        for i, piece in enumerate(pieces):
            if i > 0:
                ids += [self.tok.image_id] * self.image_tokens
                sup += [False] * self.image_tokens
            if piece:
                enc = self.tok.encode(piece)
                ids += enc
                sup += [supervised] * len(enc)
        return ids, sup, len(pieces) - 1

    def encode(self, record: dict) -> EncodedSample:
        """Raises ValueError on a sample that cannot be used (no text, placeholder/image count mismatch)."""
        images = list(record.get("images") or [])
        ids, sup = [self.tok.bos_id], [False]
        n_placeholders = 0
        if "conversation" in record:
            if self.system_prompt:
                part, s, _ = self._text_with_images(self.system_prompt + "\n\n", False)
                ids, sup = ids + part, sup + s
            turns = record["conversation"]
            if not turns or not any(t.get("role") == "Assistant" for t in turns):
                raise ValueError("conversation without an assistant turn")
            for turn in turns:
                role, content = turn.get("role"), str(turn.get("content", ""))
                if role == "User":
                    part, s, n = self._text_with_images(f"User: {content}\n\n", False)
                elif role == "Assistant":
                    head, hs, _ = self._text_with_images("Assistant: ", False)
                    body, bs, n = self._text_with_images(content, True)
                    part, s = head + body + [self.tok.eos_id], hs + bs + [True]
                else:
                    raise ValueError(f"unknown role {role!r}")
                ids, sup, n_placeholders = ids + part, sup + s, n_placeholders + n
        else:
            text = str(record.get("text") or "")
            if not text.replace(IMAGE, "").strip():
                raise ValueError("sample without text")
            part, s, n_placeholders = self._text_with_images(text, True)
            ids, sup = ids + part + [self.tok.eos_id], sup + s + [True]
        if n_placeholders != len(images):
            raise ValueError(f"{n_placeholders} image placeholders but {len(images)} images")
        return self._truncate(ids, sup, images)

    def encode_tokens(self, tokens) -> EncodedSample:
        """A pre-tokenized corpus chunk: BOS + tokens, every next token supervised. Raises TokenIdError for an id
        outside ``[0, vocab_size)`` (it would index past the embedding table)."""
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if toks.size == 0:
            raise ValueError("empty corpus chunk")
        if self.vocab_size is not None:
            lo, hi = int(min(toks.min(), self.tok.bos_id)), int(max(toks.max(), self.tok.bos_id))
            if lo < 0 or hi >= self.vocab_size:
                raise TokenIdError(f"token id {hi if hi >= self.vocab_size else lo} is outside the model's "
                                   f"vocabulary (model.vocab_size={self.vocab_size})")
        if toks.size + 1 > self.seq_len + 1:  # rare (chunks are cut to seq_len): the general path
            ids = [self.tok.bos_id] + toks.tolist()
            return self._truncate(ids, [True] * len(ids), [])
        # every id is supervised: inputs are BOS + ids[:-1], targets the ids; numpy arrays, not lists (the
        # text step's hot path: one array copy per sample instead of per-token Python objects)
        return EncodedSample(tokens=np.concatenate(([self.tok.bos_id], toks[:-1])), labels=toks, images=[])

    def _truncate(self, ids: list[int], sup: list[bool], images: list[str]) -> EncodedSample:
        # inputs are ids[:-1], targets ids[1:]: keep seq_len + 1 ids, never cutting an image's run
        limit = self.seq_len + 1
        if len(ids) > limit and not self.truncate:
            raise ValueError(f"sample of {len(ids) - 1} tokens is longer than seq_len={self.seq_len}")
        if len(ids) > limit:
            cut, img = limit, self.tok.image_id
            while cut > 0 and ids[cut - 1] == img:  # the last id is only a target: no image run may touch it
                cut -= 1
            ids, sup = ids[:cut], sup[:cut]
            images = images[:sum(1 for t in ids if t == img) // self.image_tokens]
        labels = [t if s else IGNORE for t, s in zip(ids[1:], sup[1:])]
        if all(x == IGNORE for x in labels):
            raise ValueError("no supervised token fits in the sequence")
        return EncodedSample(tokens=ids[:-1], labels=labels, images=images)
