"""Resumable training checkpoints with DCP (``torch.distributed.checkpoint``).

One checkpoint is a directory ``<dir>/step_XXXXXXXX/`` holding DCP shards of the model and optimizer states
(keyed by parameter name, so it loads into any dp/tp/pp/vpp layout: DCP reshards) and ``train_state.json``
(step, the data planner's state, the resolved config, the layout it was saved in). Writing is atomic: every
rank writes into ``.tmp_step_XXXXXXXX``, rank 0 checks that every file the DCP metadata names is there and
whole, renames the directory, and only then points ``latest`` at it. A checkpoint that fails that check at
load time is skipped for the previous one, with a warning.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from vlpretrain.train.checkpoint import WEIGHTS, save_weights

log = logging.getLogger(__name__)
TRAIN_STATE = "train_state.json"
# optimizer states keyed by parameter name ("state.<fqn>.exp_avg"): the same keys in every layout
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _step_dirs(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())


def verify(path: Path) -> str | None:
    """None if ``path`` is a complete checkpoint, else what is wrong (one line)."""
    if not (path / TRAIN_STATE).is_file():
        return f"{path}: no {TRAIN_STATE}"
    try:
        json.loads((path / TRAIN_STATE).read_text())
        meta = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata means: not a usable checkpoint
        return f"{path}: unreadable metadata ({type(e).__name__}: {e})"
    sizes: dict[str, int] = {}
    for item in (meta.storage_data or {}).values():
        end = item.offset + item.length
        sizes[item.relative_path] = max(sizes.get(item.relative_path, 0), end)
    for name, need in sizes.items():
        f = path / name
        if not f.is_file():
            return f"{path}: missing shard {name}"
        if f.stat().st_size < need:
            return f"{path}: shard {name} is truncated ({f.stat().st_size} < {need} bytes)"
    return None


def find_resumable(ckpt_dir: Path, resume: str) -> Path | None:
    """``resume``: "auto" (the newest good checkpoint in ``ckpt_dir``, None if there is none) or a path."""
    if resume != "auto":
        path = Path(resume)
        if (path / "latest").is_file() or path.name == "checkpoints" or not (path / TRAIN_STATE).exists():
            if (path / "checkpoints").is_dir():
                path = path / "checkpoints"
            return find_resumable(path, "auto") or _fail(f"no usable checkpoint under {resume}")
        problem = verify(path)
        if problem:
            raise FileNotFoundError(f"checkpoint unusable: {problem}")
        return path
    candidates = _step_dirs(ckpt_dir)
    latest = ckpt_dir / "latest"
    if latest.is_file() and (ckpt_dir / latest.read_text().strip()) in candidates:
        newest = ckpt_dir / latest.read_text().strip()
        candidates = [c for c in candidates if c.name <= newest.name]
    for path in reversed(candidates):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping a damaged checkpoint: %s; trying the previous one", problem)
        print(f"warning: skipping a damaged checkpoint: {problem}", flush=True)
    return None


def _fail(msg: str):
    raise FileNotFoundError(msg)


class Checkpointer:
    """Saves and restores this rank's model parts and their optimizers (one optimizer per part)."""

    def __init__(self, ckpt_dir: Path, modules: list, optimizers: list, keep_last: int, is_main: bool,
                 async_save: bool = False):
        self.dir, self.modules, self.optimizers = ckpt_dir, modules, optimizers
        self.keep_last, self.is_main = keep_last, is_main
        self.async_save = async_save
        self._pending = None  # (future, step, train_state, tmp, final) of an asynchronous save
        # background saves talk over their own gloo group, never interleaving with training collectives
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def _state(self) -> dict:
        model, optim = {}, {}
        for m, opt in zip(self.modules, self.optimizers):
            model.update(get_model_state_dict(m))
            if opt is not None:
                optim.update(get_optimizer_state_dict(m, opt, options=FLAT))
        return {"model": model, "optim": optim}

    def save(self, step: int, train_state: dict, weights: dict | None = None) -> Path:
        """Collective. ``weights``: full tensors (on rank 0) to store beside the shards as model.safetensors.
        With ``async_save`` the shards are staged in memory and written in the background while training goes
        on; the checkpoint is verified and published (renamed, ``latest``) by the next save or ``wait()``."""
        self.wait()
        final, tmp = self.dir / f"step_{step:08d}", self.dir / f".tmp_step_{step:08d}"
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        no_dist = not dist.is_initialized()
        if self.async_save and weights is None:
            future = dcp.async_save(self._state(), checkpoint_id=str(tmp), process_group=self._group,
                                    no_dist=no_dist)
            self._pending = (future, step, train_state, tmp, final)
            return final
        dcp.save(self._state(), checkpoint_id=str(tmp), no_dist=no_dist)
        self._publish(step, train_state, tmp, final, weights)
        return final

    def wait(self) -> None:
        """Finish and publish a pending asynchronous save (collective)."""
        if self._pending is None:
            return
        future, step, train_state, tmp, final = self._pending
        self._pending = None
        result = future.result()
        if hasattr(result, "upload_completion"):  # newer torch: an AsyncSaveResponse
            result.upload_completion.result()
        self._publish(step, train_state, tmp, final, None)

    def _publish(self, step: int, train_state: dict, tmp: Path, final: Path, weights: dict | None) -> None:
        _barrier()
        if self.is_main:
            if weights:
                save_weights(weights, tmp / WEIGHTS, {"step": step})
            _write_atomic(tmp / TRAIN_STATE, json.dumps({"step": step, **train_state}, indent=1))
            problem = verify(tmp)
            if problem:
                raise RuntimeError(f"checkpoint verification failed: {problem}")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.dir / "latest", final.name)
            for old in _step_dirs(self.dir)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()

    def load(self, path: Path) -> dict:
        """Restore model and optimizer states (any layout) and return the train state."""
        state = self._state()  # templates in this layout: DCP fills them, resharding as needed
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        for m, opt in zip(self.modules, self.optimizers):
            own_model = get_model_state_dict(m)
            set_model_state_dict(m, {k: v for k, v in state["model"].items() if k in own_model})
            if opt is not None:
                own = get_optimizer_state_dict(m, opt, options=FLAT)
                set_optimizer_state_dict(m, opt, {k: state["optim"][k] for k in own}, options=FLAT)
                for group in opt.param_groups:  # kernel choices belong to this layout, not the saved one
                    for key in ("foreach", "fused", "capturable"):
                        group[key] = opt.defaults.get(key, group.get(key))
        return json.loads((path / TRAIN_STATE).read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
