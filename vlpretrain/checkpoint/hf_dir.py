"""Writing a model directory in the HF layout: config.json, optional extra files, and safetensors (one
``model.safetensors`` or ``model-0000i-of-0000n`` shards with ``model.safetensors.index.json``), shared by the
HF LLaMA (``hf_llama.py``) and DeepSeek-VL (``deepseek_vl.py``) exports.

    entries_of(source) -> {name: Entry}     our tensors (model, state dict, weights file / checkpoint dir), lazily
    check_entries(entries, cfg, keys, what) every name present with the shape a ``cfg`` model has
    write_dir(out_dir, config, entries, shard_bytes, dtype, extra_files)

Every export is written to a temporary directory beside ``out_dir``, read back (keys and shapes) and then renamed
into place (an existing ``out_dir`` is replaced only after the new one is complete). The source is a model, a
state dict in our names, or our weights file / checkpoint dir (``checkpoint/weights.py``, read lazily); tensors are
gathered (DTensor), cast (optional ``dtype``) and written one shard at a time, so a 7B export never holds a second
copy of the model. Call it on one process with full tensors (DTensors gather collectively).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vlpretrain.checkpoint.paths import WEIGHTS, WEIGHTS_INDEX, find_weights
from vlpretrain.checkpoint.pretrained import TensorSource, preview_keys
from vlpretrain.checkpoint.safetensors_stream import save_streaming
from vlpretrain.config import ModelConfig
from vlpretrain.models.state_dict_adapter import param_shapes


def torch_dtype_name(dtype: torch.dtype | str | None) -> str:
    """config.json's ``torch_dtype`` for ``dtype`` (None: float32)."""
    if dtype is None:
        return "float32"
    return str(dtype).removeprefix("torch.")


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


@dataclasses.dataclass
class Entry:
    """One tensor to write: shape and dtype known up front, the values read only when its shard is written."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    get: Callable[[], torch.Tensor]
    device: torch.device = torch.device("cpu")


Source = nn.Module | Mapping[str, torch.Tensor] | str | Path


def entries_of(src: Source) -> dict[str, Entry]:
    """Our tensors by name: a model, a state dict, or our weights file / checkpoint dir (``find_weights``; read
    lazily with ``safe_open``, so a 7B export holds one shard at a time)."""
    if isinstance(src, (str, Path)):
        found = find_weights(src)
        if found.is_dir():  # a DCP checkpoint without full weights: read tensor by tensor from its shards
            return _dcp_entries(found)
        tensors = TensorSource.from_safetensors([found], str(found))  # opens the file per read: no pages kept
        with safe_open(str(found), framework="pt", device="cpu") as h:
            dtypes = {k: _ST_DTYPES[h.get_slice(k).get_dtype()] for k in h.keys()}
        return {k: Entry(tensors.shape(k), dtypes[k], lambda k=k: tensors.get(k)) for k in tensors.keys()}
    state = src if isinstance(src, Mapping) else src.state_dict()
    return {k: Entry(tuple(v.shape), v.dtype, lambda v=v: v, v.device) for k, v in state.items()}


def _dcp_entries(step_dir: Path) -> dict[str, Entry]:
    """The model tensors of a DCP checkpoint, each loaded alone (``dcp.load`` of one key, no process group)
    when it is written: the export never holds more than one tensor."""
    from vlpretrain.checkpoint.integrity import SafeReader, load_dcp

    meta = SafeReader(str(step_dir)).read_metadata()

    def load(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        state = {key: torch.empty(shape, dtype=dtype)}
        load_dcp(state, step_dir, no_dist=True)
        return state[key]

    return {k[len("model."):]: Entry(tuple(m.size), m.properties.dtype,
                                     functools.partial(load, k, tuple(m.size), m.properties.dtype))
            for k, m in meta.state_dict_metadata.items() if k.startswith("model.") and hasattr(m, "size")}


def _full(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # DTensor (FSDP / TP): gather the full tensor (a collective: every rank calls)
        t = t.full_tensor()
    t = t.detach()
    if t.is_meta:
        raise ValueError("cannot export meta tensors: materialise the model first")
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.cpu().contiguous()


def check_entries(entries: Mapping[str, Entry], cfg: ModelConfig, keys: list[str], what: str) -> None:
    """Every name in ``keys`` must be present with the shape a ``cfg`` model has."""
    want = param_shapes(cfg)
    missing = [k for k in keys if k not in entries]
    if missing:
        raise ValueError(f"{what}: the weights lack {len(missing)} parameters of the model config, e.g. "
                         f"{preview_keys(missing)} (a whole model is needed, not one pipeline stage)")
    for k in keys:
        if entries[k].shape != want[k]:
            raise ValueError(f"{what}: {k} has shape {entries[k].shape}, the model config gives {want[k]}")


def _shard_plan(items: list[tuple[str, int]], shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in items:
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_dir(out_dir: str | Path, config: dict, entries: Mapping[str, Entry], shard_bytes: int,
              dtype: torch.dtype | None, extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write config.json, ``extra_files`` (name -> bytes: processor / tokenizer files) and the tensors (single
    file or shards + index) into a temp dir beside ``out_dir``, read the files back (names, shapes), then rename
    the temp dir to ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

        def nbytes(e: Entry) -> int:
            dt = dtype if (dtype is not None and e.dtype.is_floating_point) else e.dtype
            return math.prod(e.shape) * torch.empty((), dtype=dt).element_size()

        sizes = {n: nbytes(e) for n, e in entries.items()}
        shards = _shard_plan(list(sizes.items()), shard_bytes)
        if len(shards) == 1:
            files = [WEIGHTS]
        else:
            files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map: dict[str, str] = {}
        def out_dtype(e: Entry) -> torch.dtype:
            return dtype if (dtype is not None and e.dtype.is_floating_point) else e.dtype

        for file, shard in zip(files, shards):  # tensor by tensor: one tensor in memory, not one shard
            specs = {n: (entries[n].shape, out_dtype(entries[n])) for n in shard}
            save_streaming(tmp / file, ((n, _full(entries[n].get(), dtype)) for n in shard), specs,
                           metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (tmp / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        seen = 0
        for file in files:  # read back before publishing
            with safe_open(str(tmp / file), framework="pt") as f:
                for k in f.keys():
                    seen += 1
                    if weight_map.get(k) != file or tuple(f.get_slice(k).get_shape()) != entries[k].shape:
                        raise RuntimeError(f"export verification failed for {k} in {tmp / file}")
        if seen != len(entries):
            raise RuntimeError(f"export verification failed: {seen} tensors written, {len(entries)} expected")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
