"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

The text goes to a temporary file beside the target (named with the pid, so processes writing the same file,
e.g. ranks refreshing one index, never share a temporary), then ``os.replace`` swaps it in. A crash leaves at
most a stray ``.<name>.<pid>.tmp``. ``fsync=True`` also flushes the file before the swap (checkpoint metadata
that must survive a power loss, not just a crash of this process).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one step; the temporary file is removed on any error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, *, compact: bool = True, fsync: bool = False) -> None:
    """``obj`` as one JSON document (compact, one line, by default), written atomically."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":")) if compact else json.dumps(obj, indent=0)
    write_text_atomic(path, text + "\n", fsync=fsync)
