"""Weight checkpoints in safetensors, written atomically (temp dir -> verify -> rename -> ``latest`` last).

Used for ``init_from`` between stages and for the weights a run leaves behind (multi-process runs stream them
tensor by tensor: ``checkpoint/sharded_weights.py``); ``meta.json`` carries the data state beside them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vlpretrain.checkpoint.integrity import (
    MANIFEST,
    SafeReader,
    check_file,
    check_manifest,
    hash_files,
    load_dcp,
    read_manifest,
    write_manifest,
)
from vlpretrain.checkpoint.paths import DCP_METADATA, WEIGHTS, find_weights  # noqa: F401  (re-exported)
from vlpretrain.errors import CheckpointError
from vlpretrain.files import write_text_atomic


def _state(model_or_state: nn.Module | dict) -> dict[str, torch.Tensor]:
    return model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()


def save_weights(model: nn.Module | dict, path: Path, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in _state(model).items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates it 0600: honour the umask like every other file
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def save_checkpoint(model: nn.Module | dict, ckpt_dir: Path, step: int, meta: dict, keep_last: int) -> Path:
    """``<ckpt_dir>/step_XXXXXXXX/`` with model.safetensors + meta.json; ``latest`` updated last."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(model, tmp / WEIGHTS, {"step": step})
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
    write_manifest(tmp, hash_files([tmp / WEIGHTS, tmp / "meta.json"]))
    with safe_open(str(tmp / WEIGHTS), framework="pt") as f:  # verify it reads back before publishing
        if set(f.keys()) != set(_state(model).keys()):
            raise RuntimeError(f"checkpoint verification failed for {tmp}")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(ckpt_dir / "latest", final.name)
    older = sorted(p for p in ckpt_dir.iterdir() if re.fullmatch(r"step_\d{8}", p.name) and p.name < final.name)
    for p in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


_verified: set[tuple] = set()


def verified(found: Path) -> Path:
    """``found`` (from find_weights) after checking it against its manifest: a whole DCP checkpoint dir, or a
    weights file with a manifest beside it (a bare file without one is taken as it is). CheckpointError (one
    line) if a file is damaged. Checked once per process (a pipeline rank loads several parts from it)."""
    key = (str(found.resolve()), found.stat().st_mtime_ns)
    if key in _verified:
        return found
    if found.is_dir():
        from vlpretrain.checkpoint.dcp import TRAIN_STATE, verify

        problem = verify(found) if (found / TRAIN_STATE).is_file() else check_manifest(found)
    else:
        entry = (read_manifest(found.parent) or {}).get(found.name) if (found.parent / MANIFEST).is_file() else None
        problem = check_file(found.parent, found.name, entry) or _not_safetensors(found)
    if problem:
        raise CheckpointError(f"checkpoint unusable: {problem}")
    _verified.add(key)
    return found


def _not_safetensors(path: Path) -> str | None:
    """None if ``path`` has a readable safetensors header, else what is wrong (one line): a file given as
    weights that is not one fails here, not in the middle of a load."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: any unreadable header
        why = str(e).splitlines()[0] if str(e) else ""
        return f"{path} is not a safetensors weights file ({type(e).__name__}: {why})"
    return None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Full weights (CPU tensors, our parameter names) from a safetensors file or a DCP checkpoint; one process."""

    found = verified(find_weights(path))
    if found.is_file():
        return load_file(str(found))
    meta = SafeReader(str(found)).read_metadata()
    template = {k: torch.empty(m.size, dtype=m.properties.dtype)
                for k, m in meta.state_dict_metadata.items() if k.startswith("model.") and hasattr(m, "size")}
    load_dcp(template, found, no_dist=True)
    return {k[len("model."):]: v for k, v in template.items()}


def load_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load every parameter ``model`` holds (a whole model or one pipeline stage, plain or sharded) from the
    weights at ``path``; returns the checkpoint keys the model does not hold. From DCP shards the load is a
    collective over all ranks (each rank reads what its shards need: any layout)."""
    from vlpretrain.checkpoint.pretrained import TensorSource, copy_checked

    file = verified(find_weights(path))
    own = model.state_dict()
    if file.is_dir():
        return _load_dcp_weights(model, file)
    src = TensorSource.from_safetensors([file], str(file))
    keys = set(src.keys())
    missing = sorted(set(own) - keys)
    if missing:
        raise CheckpointError(f"{file}: missing {len(missing)} model keys, e.g. {missing[:3]}")
    for k, v in own.items():
        if src.shape(k) != tuple(v.shape):
            raise CheckpointError(f"{file}: shape mismatch for {k}: {src.shape(k)} in the file, {tuple(v.shape)} here")
    copy_checked(src, {k: k for k in own}, own)  # each rank reads only the slices it holds
    return sorted(keys - set(own))


def _load_dcp_weights(model: nn.Module, step_dir: Path) -> list[str]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    meta = SafeReader(str(step_dir)).read_metadata()
    keys = {k[len("model."):] for k in meta.state_dict_metadata if k.startswith("model.")}
    own = get_model_state_dict(model)
    missing = sorted(set(own) - keys)
    if missing:
        raise CheckpointError(f"{step_dir}: missing {len(missing)} model keys, e.g. {missing[:3]}")
    for k, v in own.items():
        m = meta.state_dict_metadata[f"model.{k}"]
        if hasattr(m, "size") and tuple(m.size) != tuple(v.shape):
            raise CheckpointError(f"{step_dir}: shape mismatch for {k}: {tuple(m.size)} in the checkpoint, "
                                  f"{tuple(v.shape)} here")
    state = {"model": own}
    load_dcp(state, step_dir)
    set_model_state_dict(model, state["model"])
    return sorted(keys - set(own))
