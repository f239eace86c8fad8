"""Local Parquet files (the Hugging Face datasets layout) read in place, behind the ``Source`` interface.

An image column (struct {bytes, path}, binary, or a list of those) and a text column (a caption string, or LLaVA
conversations), via pyarrow, one row group at a time (a small per-process cache), never a whole file. Rows map
onto our samples as the other formats users have do (``formats.caption_record`` / ``formats.chat_record``: the
same as ``data_tools convert``); bad rows and images are handled as there (see ``formats.py``). Sizes are stored in
``<file>.sizes.json`` next to each ``.parquet`` file, keyed by the tokenizer, the columns and the file's
fingerprint.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from vlpretrain.config import SourceConfig
from vlpretrain.data.formats import cached_sizes, caption_record, chat_record, store_sizes, tagged_key, timed_entries
from vlpretrain.data.preprocess import decode_image
from vlpretrain.data.shard_index import fingerprint
from vlpretrain.data.shards import BadSample
from vlpretrain.data.sizes import SizeTable, table_from_entries
from vlpretrain.data.sources import Source
from vlpretrain.errors import UserError

IMAGE_COLUMNS = ("image", "images", "jpg", "png", "img")
TEXT_COLUMNS = ("conversations", "conversation", "text", "caption", "txt")


def parquet_files(path: Path) -> list[Path]:
    """A .parquet file, a directory (its *.parquet, recursively, sorted) or a glob."""
    import glob

    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no *.parquet file in directory {path}")
        return files
    text = str(path)
    if any(c in text for c in "*?[") and not path.exists():
        files = sorted(Path(m) for m in glob.glob(text) if m.endswith(".parquet"))
        if not files:
            raise FileNotFoundError(f"no Parquet file matches {path}")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    return [path]


class RowGroupCache:
    """The row groups' columns last read in this process, up to ``max_items`` and ``max_bytes`` (the newest one
    is always kept). In a shuffled order a row group is read once per sample it holds unless it stays here."""

    def __init__(self, max_items: int, max_bytes: int | None = None):
        self.max_items, self.max_bytes, self.items, self.bytes = max_items, max_bytes, OrderedDict(), 0

    def get(self, key, load):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key][0]
        value = load()
        size = int(getattr(value, "nbytes", 0))
        self.items[key] = (value, size)
        self.bytes += size
        while len(self.items) > 1 and (len(self.items) > self.max_items
                                       or (self.max_bytes is not None and self.bytes > self.max_bytes)):
            self.bytes -= self.items.popitem(last=False)[1][1]
        return value


def image_value_kind(arrow_type) -> str:
    """'struct' ({bytes, path}), 'binary', 'list-struct' or 'list-binary'; '' if not an image column."""
    import pyarrow as pa

    def single(t) -> str:
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return "struct"
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return "binary"
        return ""

    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        inner = single(arrow_type.value_type)
        return f"list-{inner}" if inner else ""
    return single(arrow_type)


def image_bytes(value, image_root: Path, where: str, key: str) -> bytes:
    """One image cell (bytes, or {bytes, path}) -> its encoded bytes (a path: a file under ``image_root``)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            p = Path(value["path"])
            p = p if p.is_absolute() else image_root / p
            try:
                return p.read_bytes()
            except OSError as e:
                raise BadSample(f"image file {p}: {e.strerror or e}", where, key) from None
    raise BadSample("empty image cell", where, key)


def _count_images(value) -> int:
    if value is None:
        return 0
    if isinstance(value, list):
        return sum(_count_images(v) for v in value)
    if isinstance(value, dict):
        return int(bool(value.get("bytes") or value.get("path")))
    return int(bool(value))


class ParquetSource(Source):
    """Rows of local Parquet files (in file order, then row order); each read touches one row group's column."""

    SIZES_TAG = "parquet-1"
    # per process: image columns of recent row groups (a big row group of big images is always kept alone)
    IMAGE_CACHE_BYTES = 256 << 20

    def __init__(self, cfg: SourceConfig, files: list[Path], image_root: Path | None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(cfg)
        self.files, self.image_root = files, image_root
        self.text_col = self.image_col = None
        self.units: list[tuple[int, int]] = []  # (file, row group) in order
        starts, file_first = [0], []
        for f_i, f in enumerate(files):
            try:
                pf = pq.ParquetFile(f)
            except (OSError, pa.ArrowException) as e:
                raise UserError(f"{f}: not a readable Parquet file ({e})") from None
            self._check_columns(f, pf.schema_arrow)
            file_first.append(starts[-1])
            for rg in range(pf.metadata.num_row_groups):
                self.units.append((f_i, rg))
                starts.append(starts[-1] + pf.metadata.row_group(rg).num_rows)
        self.unit_starts = np.asarray(starts, np.int64)
        self.file_first = file_first
        self._init_caches()

    def _check_columns(self, f: Path, schema) -> None:
        import pyarrow as pa

        names = schema.names

        def pick(given: str, options: tuple[str, ...], what: str, required: bool) -> str | None:
            if given:
                if given not in names:
                    raise UserError(f"{f}: no column '{given}' ({what}; the file has: {', '.join(names)})")
                return given
            found = next((c for c in options if c in names), None)
            if found is None and required:
                raise UserError(f"{f}: no {what} column (looked for {', '.join(options)}; the file has: "
                                f"{', '.join(names)}); set the source's {what}_column")
            return found

        text = pick(self.cfg.text_column, TEXT_COLUMNS, "text", True)
        image = pick(self.cfg.image_column, IMAGE_COLUMNS, "image", False)
        if self.text_col is not None and (text, image) != (self.text_col, self.image_col):
            raise UserError(f"{f}: columns differ from {self.files[0]} (text {text}, image {image})")
        t = schema.field(text).type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            chat = text in ("conversations", "conversation")  # a JSON string of turns
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            chat = True
        else:
            raise UserError(f"{f}: column '{text}' is {t}, not text or a list of conversation turns")
        kind = image_value_kind(schema.field(image).type) if image else ""
        if image and not kind:
            raise UserError(f"{f}: column '{image}' is {schema.field(image).type}, not an image column "
                            f"(struct<bytes, path>, binary, or a list of those)")
        self.text_col, self.image_col, self.chat, self.kind = text, image, chat, kind

    def _init_caches(self) -> None:
        self._pf: dict[int, object] = {}
        self._pid = os.getpid()
        self._texts, self._images = RowGroupCache(16), RowGroupCache(1 << 16, self.IMAGE_CACHE_BYTES)
        self._counts: dict[int, list[int] | None] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_pf", "_texts", "_images", "_counts"):
            state.pop(k)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_caches()

    def __len__(self) -> int:
        return int(self.unit_starts[-1])

    def _file(self, f_i: int):
        import pyarrow.parquet as pq

        if self._pid != os.getpid():  # forked: own handles and caches
            self._init_caches()
        pf = self._pf.get(f_i)
        if pf is None:
            pf = self._pf[f_i] = pq.ParquetFile(self.files[f_i])
        return pf

    def _where(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} samples")
        u = int(np.searchsorted(self.unit_starts, i, side="right")) - 1
        return u, i - int(self.unit_starts[u])

    def key(self, i: int) -> str:
        u, row = self._where(i)
        f_i = self.units[u][0]
        return f"{self.name}/{self.files[f_i].stem}/{i - self.file_first[f_i]}"

    def where(self, i: int) -> dict:
        f_i = self.units[self._where(i)[0]][0]
        return {"file": str(self.files[f_i]), "row": i - self.file_first[f_i]}

    def _content_parts(self) -> list:
        return [fingerprint(f) for f in self.files]

    def _column(self, u: int, column: str):
        import pyarrow as pa

        f_i, rg = self.units[u]
        try:
            return self._file(f_i).read_row_group(rg, columns=[column]).column(0)
        except (OSError, pa.ArrowException) as e:
            raise BadSample(f"unreadable row group {rg} ({column}): {e}", self.files[f_i]) from None

    def _image_counts(self, u: int) -> list[int] | None:
        """Images per row of unit ``u``; None: one per row (the footer's statistics say no cell is null)."""
        if u in self._counts:
            return self._counts[u]
        counts = None
        if self.kind in ("struct", "binary"):
            f_i, rg = self.units[u]
            meta = self._file(f_i).metadata.row_group(rg)
            leaf = f"{self.image_col}.bytes" if self.kind == "struct" else self.image_col
            stats = next((meta.column(k).statistics for k in range(meta.num_columns)
                          if meta.column(k).path_in_schema == leaf), None)
            if not (stats is not None and getattr(stats, "has_null_count", True) and stats.null_count == 0):
                counts = [_count_images(v) for v in self._column(u, self.image_col).to_pylist()]
        else:
            counts = [_count_images(v) for v in self._column(u, self.image_col).to_pylist()]
        self._counts[u] = counts
        return counts

    def record(self, i: int) -> dict:
        u, row = self._where(i)
        texts = self._texts.get(u, lambda: self._column(u, self.text_col).to_pylist())
        n = 0
        if self.image_col:
            counts = self._image_counts(u)
            n = 1 if counts is None else counts[row]
        try:
            rec = chat_record(texts[row], n) if self.chat else caption_record(texts[row], n)
        except ValueError as e:
            raise BadSample(str(e), self.files[self.units[u][0]], self.key(i)) from None
        rec["images"] = [str(j) for j in range(n)]
        return rec

    def image(self, i: int, j: int, record: dict) -> torch.Tensor:
        u, row = self._where(i)
        f = self.files[self.units[u][0]]
        col = self._images.get(u, lambda: self._column(u, self.image_col))
        cell = col[row].as_py()
        if isinstance(cell, list):
            cell = [v for v in cell if _count_images(v)][j]
        raw = image_bytes(cell, self.image_root or f.parent, str(f), self.key(i))
        return decode_image(raw, str(f), self.key(i))

    def size_table(self, tokenizer, system_prompt: str, vocab_size: int) -> SizeTable:
        root = str(self.image_root.resolve()) if self.image_root else ""
        key = tagged_key(tokenizer, system_prompt, self.SIZES_TAG, self.text_col, self.image_col or "", root)
        entries: list = []
        for f_i, f in enumerate(self.files):
            first = self.file_first[f_i]
            n = (self.file_first[f_i + 1] if f_i + 1 < len(self.files) else len(self)) - first
            side, content = Path(f"{f}.sizes.json"), fingerprint(f)
            table = cached_sizes(side, key, content, n)
            if table is not None:
                part = [reason if (reason := table.reasons.get(k)) is not None else
                        [int(table.text[k]), int(table.labels[k]), int(table.images[k])] for k in range(n)]
            else:
                part = timed_entries(f"{self.name}/{f.name}", n, lambda k, first=first: self.record(first + k),
                                     tokenizer, system_prompt)
                store_sizes(side, key, content, part)
            entries += part
        return table_from_entries(entries)
