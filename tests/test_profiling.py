"""``train.profile.steps``: a Chrome trace per rank and a pipeline timeline with the measured bubble fraction
beside the schedule's theoretical one (a pp=2 torchrun run of the tiny model), and the pieces behind it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import REPO, TINY

from vlpretrain.config import ConfigError, load_config
from vlpretrain.layout_rules import theoretical_bubble
from vlpretrain.train.profiling import extract_blocks, instrument, uninstrument


def test_theoretical_bubble():
    assert theoretical_bubble("1f1b", 2, 1, 4) == pytest.approx(1 / 5)
    assert theoretical_bubble("gpipe", 4, 1, 8) == pytest.approx(3 / 11)
    assert theoretical_bubble("interleaved_1f1b", 4, 2, 8) == pytest.approx(3 / 19)
    assert theoretical_bubble("zero_bubble", 2, 2, 4) == pytest.approx(1 / 25)
    assert theoretical_bubble("zbv", 2, 2, 4) == 0.0
    assert theoretical_bubble("1f1b", 1, 1, 4) == 0.0


def test_profile_steps_config():
    assert load_config(TINY / "stage2.yaml", ["train.profile.steps=[2,3]"]).train.profile.steps == [2, 3]
    for bad in ("[3,2]", "[1]", "[1,100000]"):
        with pytest.raises(ConfigError, match=r"train\.profile\.steps"):
            load_config(TINY / "stage2.yaml", [f"train.profile.steps={bad}"])


class _Stage:
    stage_index = 1

    def forward_one_chunk(self, mb, *args, **kwargs):
        return "f"

    def backward_one_chunk(self, mb, loss=None, full_backward=True, last_backward=False):
        return "b"

    def backward_weight_one_chunk(self, mb, last_backward=False):
        return "w"


def test_instrument_labels_and_undo():
    """Labels carry kind, stage and microbatch (the zero-bubble input-grad half is 'I'); undo restores the
    schedule exactly (its instance attribute _loss_fn included)."""
    import torch

    stage = _Stage()
    loss_fn = lambda out, target: 0.0  # noqa: E731
    sched = SimpleNamespace(_stage=stage, _loss_fn=loss_fn)
    undo = instrument(sched)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.autograd.profiler.record_function("vlp:step 7"):
            stage.forward_one_chunk(3, None)
            sched._loss_fn(None, None)
            stage.backward_one_chunk(3, loss=None, full_backward=False)
            stage.backward_weight_one_chunk(3)
            stage.backward_one_chunk(2)
    uninstrument(undo)
    assert sched._loss_fn is loss_fn and "forward_one_chunk" not in vars(stage)
    path = REPO / ".pytest_cache" / "profiling_trace.json"
    path.parent.mkdir(exist_ok=True)
    prof.export_chrome_trace(str(path))
    got = extract_blocks(json.loads(path.read_text()))
    path.unlink()
    assert [b[:3] for b in got["blocks"]] == [["F", 1, 3], ["L", 1, 0], ["I", 1, 3], ["W", 1, 3], ["B", 1, 2]]
    assert [s[0] for s in got["steps"]] == [7] and not got["device"]
    assert got["blocks"][0][3] > 1e15  # absolute microseconds: the ranks' traces share one clock


def test_pp2_profile_timeline(demo_dir, tmp_path):
    """pp=2 1F1B, 4 microbatches, step 3 profiled: a trace per rank, the timeline, the bubble fractions."""
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    sets = [f"data.root={demo_dir}", f"train.run_dir={run}", "train.init_from=", "train.eval_file=",
            "train.eval_text=", "train.steps=3", "train.global_batch_size=8", "train.micro_batch_size=2",
            "train.seq_len=128", "parallel.pp=2", "parallel.layer_split=[1,3]", "train.profile.steps=[3,3]",
            "logging.log_interval=1000"]
    cfg = load_config(TINY / "stage2.yaml", [])
    if not hasattr(cfg.train, "eval_text"):  # older trees: no text evaluation
        sets.remove("train.eval_text=")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "vlpretrain", "train", "--config", str(TINY / "stage2.yaml"), "--set", *sets],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    prof = run / "profile"
    for rank in (0, 1):
        trace = json.loads((prof / f"trace_rank{rank}.json").read_text())
        assert any(e.get("name", "").startswith("vlp:F") for e in trace["traceEvents"])
        blocks = json.loads((prof / f"blocks_rank{rank}.json").read_text())
        kinds = {(b[0], b[2]) for b in blocks["blocks"]}
        assert {("F", m) for m in range(4)} | {("B", m) for m in range(4)} <= kinds  # every microbatch
        assert {b[1] for b in blocks["blocks"]} == {rank}  # the rank's own stage
    bubble = json.loads((prof / "bubble.json").read_text())
    assert bubble["schedule"] == "1f1b" and bubble["microbatches"] == 4
    assert bubble["theoretical"] == pytest.approx(0.2)
    assert 0.0 < bubble["measured"] < 1.0
    assert (prof / "timeline.png").stat().st_size > 10_000
    assert "pipeline bubble measured" in proc.stdout
    print(f"\npp=2 1f1b m=4: bubble measured {bubble['measured']:.3f} vs theoretical {bubble['theoretical']:.3f}")
    from vlpretrain.report import write_report  # the report shows the timeline

    assert "timeline_0.png" in write_report([run], tmp_path / "report")["figures"]
