"""Checkpoint integrity under faults: damaged checkpoints are moved aside and never counted by pruning, every
file is checksummed (manifest.json) and checked at load, a crafted DCP ``.metadata`` runs no code on any path,
a full or read-only disk gives one line (at start-up, or at a save without losing the previous checkpoint),
mismatching train states / models / trainable parts give one line, and model.safetensors honours the umask."""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY

from vlpretrain.checkpoint.dcp import Checkpointer, find_resumable, verify
from vlpretrain.checkpoint.integrity import KEY, MANIFEST, check_checkpoint_room, crc32_file
from vlpretrain.checkpoint.weights import read_weights, save_weights
from vlpretrain.cli import main
from vlpretrain.config import load_config
from vlpretrain.errors import CheckpointError
from vlpretrain.train.trainer import train

STAGE1 = TINY / "stage1.yaml"


def _cfg(demo_dir: Path, run_dir: Path, *overrides: str, config: Path = STAGE1):
    base = [f"data.root={demo_dir}", f"train.run_dir={run_dir}", "train.init_from=", "train.eval_file=",
            "train.global_batch_size=8", "train.micro_batch_size=4", "train.seq_len=128",
            "logging.log_interval=1000", "checkpoint.interval=2"]
    return load_config(config, base + list(overrides))


@pytest.fixture(scope="module")
def base_run(demo_dir, tmp_path_factory) -> Path:
    """A tiny stage-1 run of 6 steps: step_2, step_4 (DCP shards) and step_6 (shards + model.safetensors)."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(_cfg(demo_dir, run, "train.steps=6", "checkpoint.keep_last=5"))
    return run


def _copy(base_run: Path, dst: Path) -> Path:
    shutil.copytree(base_run / "checkpoints", dst / "checkpoints")
    return dst / "checkpoints"


def _flip(path: Path, at: int = 4096) -> None:
    """XOR 64 bytes in the middle of a file: same size, different content (bit rot, a bad copy)."""
    b = bytearray(path.read_bytes())
    at = min(at, len(b) - 64)
    b[at:at + 64] = bytes(x ^ 0x5A for x in b[at:at + 64])
    path.write_bytes(bytes(b))


def _rewrite(path: Path, data: bytes) -> None:
    """Replace a checkpoint file and make its manifest agree (a writer bug or a forger, not bit rot)."""
    path.write_bytes(data)
    manifest = json.loads((path.parent / MANIFEST).read_text())
    manifest["files"][path.name] = {"size": len(data), KEY: crc32_file(path)}
    (path.parent / MANIFEST).write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------------------------
# 1. pruning never deletes good checkpoints


@pytest.mark.parametrize("keep_last", [1, 2])
def test_damaged_newest_is_moved_aside_and_never_counted(demo_dir, tmp_path, capsys, keep_last):
    """The issue's reproduction: interval=2, steps=6, truncate a shard of step_6, rerun steps=5 --resume auto.
    Before: step_4 was pruned for the damaged step_6 (which counted in keep_last) and ``latest`` named a
    deleted dir. Now step_6 goes aside as step_6.damaged and the good checkpoints stay."""
    run = tmp_path / "run"
    train(_cfg(demo_dir, run, "train.steps=6", f"checkpoint.keep_last={keep_last}"))
    ck = run / "checkpoints"
    shard = ck / "step_00000006" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    capsys.readouterr()
    train(_cfg(demo_dir, run, "train.steps=5", f"checkpoint.keep_last={keep_last}", "checkpoint.resume=auto"))
    out = capsys.readouterr().out
    assert "skipping a damaged checkpoint" in out and "__0_0.distcp" in out
    names = sorted(p.name for p in ck.iterdir())
    if keep_last == 2:  # step_4 survived the first run: resume from it
        assert "(step 4," in out
        assert names == ["latest", "step_00000004", "step_00000005", "step_00000006.damaged"]
    else:  # keep_last=1 kept only step_6, now damaged: a fresh start, and the damaged one is still kept aside
        assert "resumed from" not in out
        assert names == ["latest", "step_00000005", "step_00000006.damaged"]
    assert (ck / "latest").read_text() == "step_00000005"
    assert find_resumable(ck, "auto") == ck / "step_00000005" and verify(ck / "step_00000005") is None


# ---------------------------------------------------------------------------------------------------------------
# 2. checksums


def test_checksum_of_pieces(tmp_path, monkeypatch):
    import zlib

    import vlpretrain.checkpoint.integrity as integrity

    monkeypatch.setattr(integrity, "PIECE", 1000)
    monkeypatch.setattr(integrity, "READ", 300)
    data = os.urandom(2500)
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    pieces = b"".join(zlib.crc32(data[i:i + 1000]).to_bytes(4, "big") for i in range(0, 2500, 1000))
    assert crc32_file(tmp_path / "f") == f"{zlib.crc32(pieces):08x}"
    entries = integrity.hash_files([tmp_path / "f", tmp_path / "empty"])
    assert entries["f"] == {"size": 2500, KEY: f"{zlib.crc32(pieces):08x}"} and entries["empty"]["size"] == 0


def test_flipped_bytes_in_a_shard_fall_back_with_a_warning(base_run, tmp_path, capsys):
    ck = _copy(base_run, tmp_path)
    _flip(ck / "step_00000006" / "__0_0.distcp", at=100_000)
    problem = verify(ck / "step_00000006")
    assert "__0_0.distcp is corrupted (checksum mismatch)" in problem
    assert find_resumable(ck, "auto") == ck / "step_00000004"
    assert "__0_0.distcp is corrupted" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="__0_0.distcp is corrupted") as exc:
        find_resumable(ck, str(ck / "step_00000006"))
    assert "\n" not in str(exc.value)
    assert main(["ckpt", "verify", str(ck / "step_00000006")]) == 2
    assert main(["ckpt", "verify", str(ck / "step_00000004")]) == 0


def test_flipped_bytes_in_model_safetensors_fail_init_from(base_run, demo_dir, tmp_path, capsys):
    ck = _copy(base_run, tmp_path)
    weights = ck / "step_00000006" / "model.safetensors"
    good = tmp_path / "bare.safetensors"  # a bare file without a manifest beside it loads as it is
    shutil.copy(weights, good)
    assert read_weights(good).keys() == read_weights(weights).keys()
    _flip(weights)
    for path in (weights, ck / "step_00000006", tmp_path):  # the file, its step dir, the run dir
        with pytest.raises(CheckpointError, match="model.safetensors is corrupted"):
            read_weights(path)
    with pytest.raises(CheckpointError, match="model.safetensors is corrupted"):
        train(_cfg(demo_dir, tmp_path / "s3", "train.steps=1", f"train.init_from={weights}",
                   config=TINY / "stage3.yaml"))
    assert not (tmp_path / "s3" / "metrics.jsonl").exists()
    assert main(["ckpt", "verify", str(weights)]) == 2
    assert "model.safetensors is corrupted" in capsys.readouterr().err


def test_checkpoint_without_manifest_still_loads_size_checked(base_run, tmp_path, capsys):
    ck = _copy(base_run, tmp_path)
    for step in (4, 6):
        (ck / f"step_0000000{step}" / MANIFEST).unlink()  # as written by an older version
    assert verify(ck / "step_00000006") is None and verify(ck / "step_00000006") is None
    assert capsys.readouterr().out.count("no manifest.json") == 1  # warned once per checkpoint
    shard = ck / "step_00000006" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert "truncated" in verify(ck / "step_00000006")
    assert find_resumable(ck, "auto") == ck / "step_00000004"


# ---------------------------------------------------------------------------------------------------------------
# 3. a crafted .metadata runs no code


class _Shell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Touch:  # a dotted global (pathlib.Path.touch) on an otherwise harmless module
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("payload, manifest", [(_Shell, "forged"), (_Touch, "forged"), (_Shell, "stale"),
                                               (_Shell, "none")])
def test_malicious_metadata_runs_no_code_on_any_path(base_run, demo_dir, tmp_path, capsys, payload, manifest):
    """forged: the manifest was rewritten to match (the unpickler refuses); stale: the checksum refuses first;
    none: an old-style checkpoint without manifest (the unpickler refuses)."""
    ck = _copy(base_run, tmp_path)
    marker = tmp_path / "PWNED"
    evil = ck / "step_00000008"  # the newest: --resume auto probes it first
    shutil.copytree(ck / "step_00000004", evil)  # DCP shards only (no model.safetensors): the DCP paths
    data = pickle.dumps(payload(marker))
    if manifest == "forged":
        _rewrite(evil / ".metadata", data)
    else:
        (evil / ".metadata").write_bytes(data)
        if manifest == "none":
            (evil / MANIFEST).unlink()
    (ck / "latest").write_text(evil.name)
    expect = "refusing to load this DCP metadata" if manifest != "stale" else ".metadata"
    assert expect in verify(evil)
    assert find_resumable(ck, "auto") == ck / "step_00000006"
    calls = [lambda: find_resumable(ck, str(evil)), lambda: read_weights(evil),
             lambda: Checkpointer(ck, [torch.nn.Linear(2, 2)], [None], 1, True).load(evil),
             lambda: train(_cfg(demo_dir, tmp_path / "s3", "train.steps=1", f"train.init_from={evil}"))]
    for call in calls:
        with pytest.raises(CheckpointError, match=expect) as exc:
            call()
        assert "\n" not in str(exc.value)
    capsys.readouterr()
    cfg_args = ["--config", str(STAGE1), "--set", f"data.root={demo_dir}"]
    for argv in (["ckpt", "inspect", str(evil)], ["ckpt", "verify", str(evil)],
                 ["eval", *cfg_args, "--weights", str(evil), "--limit", "1"],
                 ["ckpt", "export", str(evil), *cfg_args, "--format", "hf", "--out", str(tmp_path / "hf")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and expect in err[0], (argv, err)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# 4. disk: room and write failures


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size, ro)`` -> a fresh tmpfs dir (skips where mounting is not permitted)."""
    mounted = []

    def mount(size: str, ro: bool = False) -> Path:
        mnt = tmp_path / f"mnt{len(mounted)}"
        mnt.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def _toy_checkpointer(ckpt_dir: Path) -> Checkpointer:
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Linear(256, 128))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 128)).sum().backward()
    opt.step()
    return Checkpointer(ckpt_dir, [model], [opt], keep_last=2, is_main=True)


def _state(step: int) -> dict:
    return {"consumed_samples": step * 8, "data_state": {}}


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmpfs):
    """Before: torch's "unexpected pos" RuntimeError, and .tmp_step_* left behind."""
    ck = tmpfs("2m") / "checkpoints"
    ckpt = _toy_checkpointer(ck)
    ckpt.save(2, _state(2))
    filler = ck.parent / "filler"
    with open(filler, "wb") as f:  # leave ~100 KB: less than one checkpoint (~800 KB)
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    filler.write_bytes(filler.read_bytes()[: -100_000])
    with pytest.raises(CheckpointError, match=f"disk full while writing checkpoint {ck}/.tmp_step_00000004") as exc:
        ckpt.save(4, _state(4))
    assert "\n" not in str(exc.value)
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000002"]
    assert (ck / "latest").read_text() == "step_00000002" and verify(ck / "step_00000002") is None
    filler.unlink()
    ckpt.save(4, _state(4))  # room again: saving works
    assert (ck / "latest").read_text() == "step_00000004"


@pytest.mark.parametrize("err, text", [(28, "disk full while writing checkpoint"), (13, "not writable"),
                                       (30, "not writable")])
def test_write_error_in_dcp_is_one_line_and_cleans_up(tmp_path, monkeypatch, err, text):
    """The same without a tmpfs: DCP reports the failure of a rank wrapped in a CheckpointException."""
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    import vlpretrain.checkpoint.dcp as checkpointer

    ck = tmp_path / "checkpoints"
    ckpt = _toy_checkpointer(ck)
    ckpt.save(2, _state(2))

    def fail(*args, **kwargs):
        try:
            raise OSError(err, os.strerror(err))
        except OSError as e:
            raise CheckpointException("save failed", {0: _wrap_exception(e)}) from None

    monkeypatch.setattr(checkpointer.dcp, "save", fail)
    with pytest.raises(CheckpointError, match=text):
        ckpt.save(4, _state(4))
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000002"]
    monkeypatch.undo()
    (ck / ".tmp_step_00000003").mkdir()  # a save killed half way by an earlier job
    (ck / ".tmp_step_00000003" / "__0_0.distcp").write_bytes(b"partial")
    ckpt.save(4, _state(4))  # the next good save removes it
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000002", "step_00000004"]


def test_no_room_or_read_only_at_start_up(tmpfs, demo_dir, tmp_path):
    small, ro = tmpfs("64k"), tmpfs("1m", ro=True)
    cfg = _cfg(demo_dir, tmp_path / "run", "train.steps=2", f"checkpoint.dir={small}/ck")
    with pytest.raises(CheckpointError, match=f"not enough room for a checkpoint in {small}/ck"):
        check_checkpoint_room(cfg, small / "ck", tmp_path / "run")
    cfg = _cfg(demo_dir, tmp_path / "run", "train.steps=2", f"checkpoint.dir={ro}/ck")
    with pytest.raises(CheckpointError, match=f"{ro}/ck is not writable"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any step


# ---------------------------------------------------------------------------------------------------------------
# 5. train state, model and trainable parts that do not match: one line


def test_empty_train_state_is_damaged(base_run, tmp_path):
    ck = _copy(base_run, tmp_path)
    _rewrite(ck / "step_00000006" / "train_state.json", b"{}")
    assert "damaged (lacks step, consumed_samples, data_state)" in verify(ck / "step_00000006")
    assert find_resumable(ck, "auto") == ck / "step_00000004"
    with pytest.raises(CheckpointError, match="train_state.json: damaged"):
        find_resumable(ck, str(ck / "step_00000006"))


def test_resume_with_another_model_shape_names_the_tensor(base_run, demo_dir, tmp_path):
    _copy(base_run, tmp_path)
    cfg = _cfg(demo_dir, tmp_path, "train.steps=8", "checkpoint.resume=auto", "model.ffn_dim=256")
    with pytest.raises(CheckpointError, match=r"this model does not match the checkpoint: \S+ is \(344, 128\) "
                                              r"in the checkpoint, \(256, 128\) here") as exc:
        train(cfg)
    assert "\n" not in str(exc.value)


def test_resume_with_other_trainable_parts_suggests_init_from(base_run, demo_dir, tmp_path):
    ck = _copy(base_run, tmp_path)
    cfg = _cfg(demo_dir, tmp_path, "train.steps=8", "checkpoint.resume=auto", "train.trainable=[adaptor,llm]")
    with pytest.raises(CheckpointError, match=r"optimizer states for adaptor but this run trains adaptor\+llm "
                                              r"\(missing: llm\).*train.init_from=") as exc:
        train(cfg)
    assert "\n" not in str(exc.value) and str(ck / "step_00000006") in str(exc.value)


# ---------------------------------------------------------------------------------------------------------------
# 6. file modes


def test_model_safetensors_honours_the_umask(base_run, tmp_path):
    old = os.umask(0o022)
    try:
        save_weights({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        save_weights({"w": torch.zeros(2)}, tmp_path / "x.safetensors")
        assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    mode = (base_run / "checkpoints" / "step_00000006" / "model.safetensors").stat().st_mode & 0o777
    assert mode == (base_run / "checkpoints" / "step_00000006" / "train_state.json").stat().st_mode & 0o777
