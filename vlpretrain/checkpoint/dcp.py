"""Resumable training checkpoints with DCP (``torch.distributed.checkpoint``).

One checkpoint is a directory ``<dir>/step_XXXXXXXX/`` holding DCP shards of the model and optimizer states
(keyed by parameter name, so it loads into any dp/tp/pp/vpp layout: DCP reshards), ``train_state.json`` (step,
the data planner's state, the resolved config, the layout it was saved in) and ``manifest.json`` (size and
checksum of every file; see integrity.py). Writing is atomic: every rank writes into ``.tmp_step_XXXXXXXX`` and
hashes its own shards, rank 0 merges the manifest, checks that every file the DCP metadata names is there and
whole, renames the directory, points ``latest`` at it, and only then prunes older ones. A checkpoint that fails
its checks at load time is skipped for the previous one with a warning (and moved aside as ``*.damaged``, never
deleted); pruning keeps the ``keep_last`` newest good ones and never counts or deletes a damaged one.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from vlpretrain.checkpoint.integrity import (
    MANIFEST,
    METADATA,
    SafeReader,
    check_manifest,
    describe_write_error,
    hash_files,
    load_dcp,
    rank_files,
    read_manifest,
    single_process_quiet,
    write_manifest,
)
from vlpretrain.checkpoint.paths import WEIGHTS, read_latest
from vlpretrain.errors import CheckpointError
from vlpretrain.files import write_text_atomic

log = logging.getLogger(__name__)
TRAIN_STATE = "train_state.json"
TRAIN_STATE_KEYS = ("step", "consumed_samples", "data_state")
# optimizer states keyed by parameter name ("state.<fqn>.exp_avg"): the same keys in every layout
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
STEP_DIR = re.compile(r"step_\d{8}")  # "step_00000006.damaged" is not one
CHECKED_FINITE = "checked_finite"  # train_state.json: every tensor was finite when it was saved (else unchecked)


REFUSAL = "refusing to save"  # how a save refused for non-finite values starts (NonFiniteStateError)


class NonFiniteStateError(CheckpointError):
    """A save refused: the state to save holds non-finite values (a diverged run, not a user's input)."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """No usable checkpoint where one was asked for."""


def step_dirs(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir())


def read_train_state(path: Path) -> dict:
    """The train state of a checkpoint dir; CheckpointError (one line) if it is missing, unreadable or partial."""
    f = path / TRAIN_STATE
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
    missing = [k for k in TRAIN_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(state["step"], int):
        raise CheckpointError(f"{f}: damaged (lacks {', '.join(missing) or 'an integer step'})")
    return state


def verify(path: Path, checksums: bool = True, finite: bool | None = None) -> str | None:
    """None if ``path`` is a complete, uncorrupted checkpoint, else what is wrong (one line). ``checksums``:
    re-hash every file against the manifest (else sizes only: for pruning, right after a verified save).
    ``finite``: also read every tensor and name the non-finite ones; None: only where the save did not check
    them (``train_state.json`` lacks ``checked_finite: true``: older versions, ``train.check_finite: false``)."""
    if not (path / TRAIN_STATE).is_file():
        return f"{path}: no {TRAIN_STATE}"
    try:
        problem = check_manifest(path, checksum=checksums)  # .metadata's checksum before it is unpickled
        if problem:
            return problem
        read_train_state(path)
        meta = SafeReader(str(path)).read_metadata()
        manifest = read_manifest(path)
    except CheckpointError as e:
        return str(e)
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
        if manifest is not None and name not in manifest:
            return f"{path}: shard {name} is not in {MANIFEST}"
    if finite is None:
        finite = read_train_state(path).get(CHECKED_FINITE) is not True
    if finite:
        bad = nonfinite_tensors(path, meta)
        if bad:
            return f"{path}: {len(bad)} tensors hold non-finite values, e.g. {bad[0]}"
    return None


def nonfinite_tensors(path: Path, meta=None, chunk_bytes: int = 1 << 28) -> list[str]:
    """The keys of a checkpoint's floating-point tensors that hold a NaN or an infinity, read in groups of about
    ``chunk_bytes`` (no process group; never the whole checkpoint in memory)."""
    meta = meta or SafeReader(str(path)).read_metadata()
    keys = [(k, tuple(m.size), m.properties.dtype) for k, m in meta.state_dict_metadata.items()
            if hasattr(m, "size") and m.properties.dtype.is_floating_point]
    bad, group, size = [], {}, 0
    for i, (k, shape, dtype) in enumerate(keys):
        group[k] = torch.empty(shape, dtype=dtype)
        size += group[k].nbytes
        if size >= chunk_bytes or i == len(keys) - 1:
            load_dcp(group, path, no_dist=True)
            bad += [name for name, t in group.items() if t.numel() and not bool(_extremes(t).isfinite().all())]
            group, size = {}, 0
    return bad


def _extremes(t: torch.Tensor) -> torch.Tensor:
    """(min, max) of ``t`` as fp32: both finite iff every element is (NaN propagates, an infinity is an extreme);
    one pass, no copy of ``t``."""
    return torch.stack(torch.aminmax(t)).float()


def first_nonfinite(state: dict) -> tuple[int, str | None]:
    """How many of the floating-point tensors of a (nested) state dict hold a non-finite value on this rank
    (local shards of DTensors), and the first one's key; one device sync for all of them."""
    names, extremes = [], []

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}{k}.", x)
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            local = v.to_local() if hasattr(v, "to_local") else v
            if local.numel():
                names.append(prefix[:-1])
                extremes.append(_extremes(local))

    walk("", state)
    if not extremes:
        return 0, None
    ok = torch.stack([e.to(extremes[0].device) for e in extremes]).isfinite().all(dim=1).cpu()
    bad = [n for n, good in zip(names, ok.tolist()) if not good]
    return len(bad), (bad[0] if bad else None)


def find_resumable(ckpt_dir: Path, resume: str, move_damaged: bool = False) -> Path | None:
    """``resume``: "auto" (the newest good checkpoint in ``ckpt_dir``, None if there is none) or a path (a step
    dir must be good: CheckpointError otherwise). ``move_damaged`` (one rank only): rename the damaged step dirs
    met on the way to ``<name>.damaged``, out of the way of pruning and of later probes."""
    if resume != "auto":
        path = Path(resume)
        if (path / "latest").is_file() or path.name == "checkpoints" or not (path / TRAIN_STATE).exists():
            if (path / "checkpoints").is_dir():
                path = path / "checkpoints"
            found = find_resumable(path, "auto", move_damaged)
            if found is None:
                raise NoCheckpointError(f"no usable checkpoint under {resume}")
            return found
        problem = verify(path)
        if problem:
            raise CheckpointError(f"checkpoint unusable: {problem}")
        return path
    candidates = step_dirs(ckpt_dir)
    latest, problem = read_latest(ckpt_dir)
    if problem:  # as if there were no ``latest``: the newest good checkpoint
        print(f"warning: {problem}: ignored, resuming from the newest good checkpoint", flush=True)
    if latest and (ckpt_dir / latest) in candidates:
        candidates = [c for c in candidates if c.name <= latest]
    for path in reversed(candidates):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping a damaged checkpoint: %s; trying the previous one", problem)
        print(f"warning: skipping a damaged checkpoint: {problem}", flush=True)
        if move_damaged:
            move_aside(path)
    return None


def move_aside(path: Path) -> Path | None:
    """Rename a damaged checkpoint dir to ``<name>.damaged`` (kept for a post-mortem, never deleted)."""
    target, n = path.with_name(path.name + ".damaged"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.damaged.{n}"), n + 1
    try:
        os.replace(path, target)
    except OSError as e:  # another rank or job moved it first, or a read-only dir: leave it, it is skipped anyway
        log.warning("could not move %s aside: %s", path, e)
        return None
    print(f"warning: moved the damaged checkpoint {path.name} aside to {target.name}", flush=True)
    return target


class Checkpointer:
    """Saves and restores this rank's model parts and their optimizers (one optimizer per part)."""

    def __init__(self, ckpt_dir: Path, modules: list, optimizers: list, keep_last: int, is_main: bool,
                 async_save: bool = False):
        self.dir, self.modules, self.optimizers = ckpt_dir, modules, optimizers
        self.keep_last, self.is_main = keep_last, is_main
        self.async_save = async_save
        self.check_finite = True  # refuse to save a state with a non-finite tensor (train.check_finite)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._pending = None  # (future, step, train_state, tmp, final) of an asynchronous save
        # checkpoint bookkeeping (and background saves) talk over their own gloo group: CPU objects, and never
        # interleaving with training collectives
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None

    def _state(self) -> dict:
        model, optim = {}, {}
        for m, opt in zip(self.modules, self.optimizers):
            model.update(get_model_state_dict(m))
            if opt is not None:
                optim.update(get_optimizer_state_dict(m, opt, options=FLAT))
        return {"model": model, "optim": optim}

    def save(self, step: int, train_state: dict, weights: Callable[[Path], Exception | None] | None = None) -> Path:
        """Collective. ``weights(path)``: a collective that writes the full weights beside the shards as
        model.safetensors (``sharded_weights.write_full_weights``) and returns this rank's write error or None.
        With ``async_save`` the shards are staged in memory and written in the background while training goes
        on; the checkpoint is verified and published (renamed, ``latest``) by the next save or ``wait()``.
        A write failure (disk full, not writable) raises CheckpointError on every rank after the partial
        directory was removed; the previous checkpoints and ``latest`` are untouched."""
        self.wait()
        final, tmp = self.dir / f"step_{step:08d}", self.dir / f".tmp_step_{step:08d}"
        problem = None
        state = self._state()
        if self.check_finite:  # agreed with the directory's creation below: one collective for both
            n, first = first_nonfinite(state)
            if n:
                problem = (f"{REFUSAL} step {step}: {n} tensors hold non-finite values on rank {self.rank}, "
                           f"e.g. {first}; {self.dir / 'latest'} is unchanged")
        if self.is_main and problem is None:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                problem = describe_write_error(e, tmp)
        self._raise_any([problem], tmp, NonFiniteStateError if self.check_finite else CheckpointError)
        train_state = {**train_state, CHECKED_FINITE: self.check_finite}
        no_dist = not dist.is_initialized()
        if self.async_save and weights is None:
            with single_process_quiet():
                future = dcp.async_save(state, storage_writer=_writer(tmp), process_group=self._group,
                                        no_dist=no_dist)
            self._pending = (future, step, train_state, tmp, final)
            return final
        try:
            with single_process_quiet():
                dcp.save(state, storage_writer=_writer(tmp), no_dist=no_dist)
            problem = None
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - one line, after cleaning up, below
            problem = describe_write_error(e, tmp)
        if weights is not None:  # collective on every rank, even after a failure, so that none waits forever
            error = weights(tmp / WEIGHTS)
            problem = problem or (describe_write_error(error, tmp) if error else None)
        local = (problem, {} if problem else hash_files(rank_files(tmp, self.rank)))
        self._publish(step, train_state, tmp, final, weights, local)
        return final

    def wait(self) -> None:
        """Finish and publish a pending asynchronous save (collective)."""
        if self._pending is None:
            return
        future, step, train_state, tmp, final = self._pending
        self._pending = None
        try:
            result = future.result()
            if hasattr(result, "upload_completion"):  # newer torch: an AsyncSaveResponse
                result.upload_completion.result()
            local = (None, hash_files(rank_files(tmp, self.rank)))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's is a BaseException
            local = (describe_write_error(e, tmp), {})
        self._publish(step, train_state, tmp, final, None, local)

    def _gather(self, obj) -> list:
        if self._group is None:
            return [obj]
        out = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def _raise_any(self, problems: list, tmp: Path, error: type[CheckpointError] = CheckpointError) -> None:
        """Collective: if any rank had a problem, remove the partial dir and raise it on every rank (as
        ``error`` when it is a refusal to save non-finite values, the only problem found before writing)."""
        problem = next((p for p in self._gather(next((p for p in problems if p), None)) if p), None)
        if problem:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise (error if problem.startswith(REFUSAL) else CheckpointError)(problem)

    def _publish(self, step: int, train_state: dict, tmp: Path, final: Path, weights: Callable | None,
                 local: tuple) -> None:
        gathered = self._gather(local)  # every rank's (problem, {shard: size + checksum})
        problem = next((p for p, _ in gathered if p), None)
        if self.is_main and problem is None:
            try:
                files = {name: entry for _, part in gathered for name, entry in part.items()}
                write_text_atomic(tmp / TRAIN_STATE, json.dumps({"step": step, **train_state}, indent=1))
                files.update(hash_files([tmp / METADATA, tmp / TRAIN_STATE] + ([tmp / WEIGHTS] if weights else [])))
                write_manifest(tmp, files)
                bad = verify(tmp, checksums=False, finite=False)  # just hashed: sizes, names and metadata suffice
                if bad:
                    problem = f"checkpoint verification failed: {bad}"
                else:
                    old = None
                    if final.exists():  # an abandoned run's checkpoint of this step: replaced
                        old = final.with_name(".old_" + final.name)
                        shutil.rmtree(old, ignore_errors=True)
                        os.replace(final, old)
                    os.replace(tmp, final)
                    write_text_atomic(self.dir / "latest", final.name)
                    if old is not None:
                        shutil.rmtree(old, ignore_errors=True)
                    self._prune(final)
            except Exception as e:  # noqa: BLE001
                problem = describe_write_error(e, tmp)
        self._raise_any([problem], tmp)

    def _prune(self, newest: Path) -> None:
        """After ``newest`` is verified and published: keep it and the ``keep_last - 1`` newest good older ones,
        move damaged ones aside (not counted, not deleted), delete the rest. Dirs newer than ``newest`` (from a
        run that went further before it was resumed from an earlier step) are not counted; damaged ones go
        aside, good ones stay until this run replaces them. Partial dirs of a killed save are removed."""
        for partial in [*self.dir.glob(".tmp_step_*"), *self.dir.glob(".old_step_*")]:
            shutil.rmtree(partial, ignore_errors=True)  # left by a killed job: never a published checkpoint
        kept = 1
        for d in reversed(step_dirs(self.dir)):
            if d == newest:
                continue
            if verify(d, checksums=False, finite=False):
                move_aside(d)
            elif d.name < newest.name:
                if kept < self.keep_last:
                    kept += 1
                else:
                    shutil.rmtree(d, ignore_errors=True)

    def load(self, path: Path) -> dict:
        """Restore model and optimizer states (any layout) and return the train state. A model or a set of
        trainable parts that does not match the checkpoint fails with one line before any tensor is read."""
        train_state = read_train_state(path)
        meta = SafeReader(str(path)).read_metadata()  # checksum, then the restricted unpickler
        state = self._state()  # templates in this layout: DCP fills them, resharding as needed
        _check_matches(path, meta.state_dict_metadata, state)
        load_dcp(state, path)
        for m, opt in zip(self.modules, self.optimizers):
            own_model = get_model_state_dict(m)
            set_model_state_dict(m, {k: v for k, v in state["model"].items() if k in own_model})
            if opt is not None:
                own = get_optimizer_state_dict(m, opt, options=FLAT)
                set_optimizer_state_dict(m, opt, {k: state["optim"][k] for k in own}, options=FLAT)
                for group in opt.param_groups:  # kernel choices belong to this layout, not the saved one
                    for key in ("foreach", "fused", "capturable"):
                        group[key] = opt.defaults.get(key, group.get(key))
        return train_state


def _writer(tmp: Path) -> FileSystemWriter:
    # no fsync inside DCP: hash_files fsyncs each file while it computes the checksums (overlapped)
    return FileSystemWriter(str(tmp), sync_files=False)


def _check_matches(path: Path, saved: dict, state: dict) -> None:
    """One line for the first way this model and its optimizers differ from the checkpoint's metadata."""
    from vlpretrain.models.vlm import part_of

    missing = []
    for name, t in state["model"].items():
        m = saved.get(f"model.{name}")
        if m is None:
            missing.append(name)
        elif hasattr(m, "size") and tuple(m.size) != tuple(t.shape):
            raise CheckpointError(f"{path}: this model does not match the checkpoint: {name} is "
                                  f"{tuple(m.size)} in the checkpoint, {tuple(t.shape)} here (model config changed?)")
    if missing:
        raise CheckpointError(f"{path}: this model has {len(missing)} tensors the checkpoint lacks, e.g. "
                              f"{missing[0]} (model config changed?)")

    def parts(keys) -> set[str]:
        return {part_of(k[len("optim.state."):].rsplit(".", 1)[0]) for k in keys if k.startswith("optim.state.")}

    lacking = [f"optim.{k}" for k in state["optim"] if f"optim.{k}" not in saved]
    if lacking:
        ours, theirs = parts(f"optim.{k}" for k in state["optim"]), parts(saved)
        raise CheckpointError(
            f"{path}: the checkpoint holds optimizer states for {'+'.join(sorted(theirs)) or 'no part'} but this "
            f"run trains {'+'.join(sorted(ours))} (missing: {'+'.join(sorted(parts(lacking)))}); resume continues "
            f"the same stage: to start a new stage from these weights, set train.init_from={path}")


