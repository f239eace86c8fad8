"""Where a run's weights are: the file and directory names every layer agrees on (no torch here)."""
from __future__ import annotations

import re
from pathlib import Path

from vlpretrain.errors import CheckpointError

WEIGHTS = "model.safetensors"  # ours, and the HF name of a single-file checkpoint
WEIGHTS_INDEX = "model.safetensors.index.json"  # HF's index of a sharded checkpoint
DCP_METADATA = ".metadata"


def read_latest(ckpt_dir: Path) -> tuple[str | None, str | None]:
    """(the step dir name ``<ckpt_dir>/latest`` holds, None) or (None, what is wrong with it, one line); (None,
    None) when there is no ``latest``."""
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None, None
    try:
        name = latest.read_bytes().decode("utf-8").strip()
    except OSError as e:
        return None, f"{latest} is unreadable ({type(e).__name__}: {e})"
    except UnicodeDecodeError:
        return None, f"{latest} is damaged (not UTF-8 text)"
    if not re.fullmatch(r"step_\d{8}", name):
        return None, f"{latest} is damaged (holds {name[:40]!r}, not a step_XXXXXXXX name)"
    return name, None


def find_weights(path: str | Path) -> Path:
    """A .safetensors file, a checkpoint step dir (full weights, else its DCP shards), a checkpoints dir with
    ``latest``, or a run dir."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / WEIGHTS).is_file():
        return p / WEIGHTS
    if (p / DCP_METADATA).is_file():
        return p
    if (p / "latest").is_file():
        name, problem = read_latest(p)
        if problem:
            raise CheckpointError(f"{problem}: write the step dir's name into it (echo step_XXXXXXXX > "
                                  f"{p / 'latest'}) or give the step dir itself")
        return find_weights(p / name)
    if (p / "checkpoints").is_dir():
        return find_weights(p / "checkpoints")
    raise FileNotFoundError(f"no weights found at {path} (expected a .safetensors file or a checkpoint dir)")
