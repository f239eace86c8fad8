"""Where a run's weights are: the file and directory names every layer agrees on (no torch here)."""
from __future__ import annotations

from pathlib import Path

WEIGHTS = "model.safetensors"  # ours, and the HF name of a single-file checkpoint
WEIGHTS_INDEX = "model.safetensors.index.json"  # HF's index of a sharded checkpoint
DCP_METADATA = ".metadata"


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
        return find_weights(p / (p / "latest").read_text().strip())
    if (p / "checkpoints").is_dir():
        return find_weights(p / "checkpoints")
    raise FileNotFoundError(f"no weights found at {path} (expected a .safetensors file or a checkpoint dir)")
