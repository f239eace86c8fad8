"""Evaluation in every layout: MCPPL (per row NLL, accuracy, per type) and held-out text bits per byte of the
same weights, run by ``vlpretrain eval`` under torchrun in (dp, tp, pp) = (1, 2, 2), (2, 1, 2) and (2, 2, 2),
equal the single-process evaluation within 1e-5."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, TINY

SETS = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_len=128"]


def _eval(demo_dir, weights, nproc: int, *layout: str) -> dict:
    cmd = [sys.executable, "-m", "vlpretrain"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "vlpretrain"]
    cmd += ["eval", "--config", str(TINY / "stage2.yaml"), "--weights", str(weights), "--set",
            f"data.root={demo_dir}", *SETS, *layout]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # one result line per job
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def weights(demo_dir, tmp_path_factory):
    """Weights of a model that differs from the random init (so loading them matters)."""
    import torch

    from vlpretrain.checkpoint.weights import save_weights
    from vlpretrain.config import load_config
    from vlpretrain.models.vlm import build_model

    cfg = load_config(TINY / "stage2.yaml", [f"data.root={demo_dir}", *SETS])
    model = build_model(cfg.model, "cpu", seed=7)
    with torch.no_grad():
        model.embed.adaptor.layers[1].bias.add_(0.05)  # not an init value: a random init cannot pass as it
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_weights(model, path)
    return path


def test_eval_in_layouts_equals_single_process(demo_dir, weights):
    ref = _eval(demo_dir, weights, 1)
    assert ref["n"] > 0 and ref["text"]["tokens"] > 0 and set(ref["by_type"])
    for nproc, layout in ((4, ["parallel.tp=2", "parallel.pp=2"]), (4, ["parallel.dp=2", "parallel.pp=2"]),
                          (8, ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2"])):
        got = _eval(demo_dir, weights, nproc, *layout)
        assert got["accuracy"] == ref["accuracy"] and got["by_type"] == ref["by_type"], layout
        assert got["option_nll"] == pytest.approx(ref["option_nll"], rel=1e-5), layout
        for key in ("bits_per_byte", "perplexity"):
            assert got["text"][key] == pytest.approx(ref["text"][key], rel=1e-5), (layout, key)
        assert got["text"]["tokens"] == ref["text"]["tokens"]
