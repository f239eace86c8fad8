"""The demo's text corpus: the Python documentation that ships with Python (pydoc_data), as training chunks,
facts and sentences for text-only chats, and the words drawn in the OCR images."""

from __future__ import annotations

import re

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


def text_chat_sources() -> tuple[list[tuple[str, str]], list[str]]:
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


def word_list() -> list[str]:
    """Plain words of 3-8 letters from the corpus, for the OCR images."""
    words = set()
    for text in _topics().values():
        words.update(w.lower() for w in re.findall(r"\b[A-Za-z]{3,8}\b", text))
    return sorted(w for w in words if len(set(w)) >= 3)  # drops "ooo", "aaa" and the like
