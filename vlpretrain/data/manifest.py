"""The data manifest and the one place that opens a source of any type.

The manifest (YAML, ``data.manifest``: a path as given, else relative to ``data.root``) lists sources with
``name, type, path, modality, category, weight``; source paths are relative to ``data.root``, so one manifest
(e.g. configs/data/*.yaml, the paper's mixtures) serves wherever the data lives. ``open_source`` picks the
reader: our own formats (``sources.py``) or those users already have (``formats.py``, ``parquet.py``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from vlpretrain.config import ConfigError, DataConfig, SourceConfig, build_dataclass
from vlpretrain.data import formats, parquet
from vlpretrain.data.indexed import idx_path
from vlpretrain.data.shards import ShardReader, expand_shards
from vlpretrain.data.sources import IndexedSource, JsonlSource, ShardSource, Source
from vlpretrain.errors import UserError


def _resolve(base: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base / p


def open_source(cfg: SourceConfig, base: Path, seq_len: int) -> Source:
    """Open one source; a missing or unreadable path fails here, at start-up, with a one-line error naming the
    source and the file."""
    name = cfg.name or cfg.path
    try:
        return _open_source(cfg, base, seq_len)
    except (FileNotFoundError, UserError) as e:
        if isinstance(e, ConfigError) or str(e).startswith(f"data source '{name}'"):
            raise
        raise type(e)(f"data source '{name}': {e}") from None


def _detect(path: Path) -> str:
    """``type: auto``: the format from the path (a .bin/.idx prefix, .jsonl, .json, .parquet or a folder of
    them); tar shards are told apart later, from their first sample (``_native``)."""
    if Path(idx_path(path)).is_file():
        return "indexed"
    if path.suffix == ".jsonl":
        try:
            with open(path, "rb") as f:
                first = next((line for line in f if line.strip()), b"")
            return "llava" if "conversations" in (json.loads(first) or {}) else "jsonl"
        except (OSError, ValueError, TypeError):
            return "jsonl"  # its own reader names the problem
    if path.suffix == ".json":
        return "llava"
    text = str(path)
    if text.endswith(".parquet") or (path.is_dir() and not any(path.glob("*.tar"))
                                     and next(path.rglob("*.parquet"), None) is not None):
        return "parquet"
    return "tar"


def _native(reader: ShardReader) -> bool:
    """Our shards (``ShardWriter``: a JSON member with text or conversation and its "images" list), or tars from
    other tools (img2dataset, webdataset's writers), read through ``formats.WebDatasetSource``."""
    if len(reader) == 0:
        return True
    try:
        rec = json.loads(reader.read_member(0, "json").decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(rec, dict) and isinstance(rec.get("images"), list) and \
        ("text" in rec or "conversation" in rec)


def _open_source(cfg: SourceConfig, base: Path, seq_len: int) -> Source:
    path = _resolve(base, cfg.path)
    kind = cfg.type if cfg.type != "auto" else _detect(path)
    name = cfg.name or cfg.path
    image_root = _resolve(base, cfg.image_root) if cfg.image_root else None
    if kind == "jsonl":
        if not path.is_file():
            raise FileNotFoundError(f"data source '{name}': file not found: {path}")
        return JsonlSource(cfg, path)
    if kind == "indexed":
        if not Path(idx_path(path)).is_file():
            raise FileNotFoundError(f"data source '{name}': no Megatron index {idx_path(path)}")
        return IndexedSource(cfg, str(path), chunk=seq_len)  # + BOS = seq_len + 1 ids = seq_len targets
    if kind == "llava":
        if not path.is_file():
            raise FileNotFoundError(f"data source '{name}': file not found: {path}")
        return formats.LlavaSource(cfg, path, image_root or path.parent)
    if kind == "parquet":
        return parquet.ParquetSource(cfg, parquet.parquet_files(path), image_root)
    try:
        paths = expand_shards(str(path))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data source '{name}': {e}") from None
    reader = ShardReader(paths)
    if kind == "tar":
        kind = "shards" if _native(reader) else "webdataset"
    return (formats.WebDatasetSource if kind == "webdataset" else ShardSource)(cfg, paths, reader)


@dataclass
class Manifest:
    base: Path
    sources: list[SourceConfig]


def _check_unique_names(sources: list[SourceConfig], where: str) -> None:
    """Counters, metrics and the data state are keyed by source name: two sources must never share one."""
    seen: dict[str, int] = {}
    for i, src in enumerate(sources):
        name = src.name or Path(src.path).stem  # == Source.name
        if name in seen:
            raise ConfigError(f"config error: {where}[{i}]: duplicate source name '{name}' "
                              f"(also {where}[{seen[name]}])")
        seen[name] = i


def load_manifest(data: DataConfig) -> Manifest:
    """Sources from ``data.manifest`` (a YAML file) or, without one, ``data.sources`` (relative to data.root)."""
    if not data.manifest:
        _check_unique_names(list(data.sources), "data.sources")
        return Manifest(Path(data.root), list(data.sources))
    path = Path(data.manifest) if Path(data.manifest).is_file() else _resolve(Path(data.root), data.manifest)
    if not path.is_file():
        raise FileNotFoundError(f"data.manifest not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), list):
        raise ConfigError(f"config error: data.manifest {path}: needs a 'sources' list")
    unknown = set(raw) - {"sources", "description"}
    if unknown:
        raise ConfigError(f"config error: data.manifest {path}: unknown key '{sorted(unknown)[0]}'")
    sources = []
    for i, s in enumerate(raw["sources"]):
        if not isinstance(s, dict):
            raise ConfigError(f"config error: data.manifest {path}: sources[{i}] is not a mapping")
        src = build_dataclass(SourceConfig, s, f"manifest.sources[{i}]")
        if src.weight <= 0:
            raise ConfigError(f"config error: manifest.sources[{i}].weight: must be positive, got {src.weight}")
        sources.append(src)
    if not sources:
        raise ConfigError(f"config error: data.manifest {path}: no sources")
    _check_unique_names(sources, f"data.manifest {path}: sources")
    return Manifest(Path(data.root), sources)
