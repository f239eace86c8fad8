"""bench/gpu_check.py --cpu-smoke: every check runs on CPU at tiny size and prints one JSON line each.

Slow-ish (a subprocess importing torch, timm and transformers, plus a CPU flex compile: ~10-25 s on two cores).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKS = ["env", "stage2", "attention", "plan_memory", "te", "summary"]


def test_gpu_check_cpu_smoke():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-smoke"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line is JSON
    assert [d["check"] for d in lines] == CHECKS
    by = {d["check"]: d for d in lines}
    assert by["env"]["mode"] == "cpu-smoke"
    assert by["summary"]["errors"] == [] and by["summary"]["skipped_or_stopped"] == [], by["summary"]

    a = by["stage2"]
    assert a["timed_steps"]["text"] >= 1 and a["timed_steps"]["multimodal"] >= 1  # modality-grouped steps
    for side in ("engine", "baseline"):
        assert a[side]["timed_steps"] >= 1 and a[side]["tokens_per_s"] > 0 and a[side]["mfu"] > 0
        assert set(a[side]["by_kind"]) == {"text", "multimodal"}
    assert a["baseline"]["attn_implementation"] == "sdpa"
    assert a["engine_over_baseline_tokens_per_s"] > 0 and set(a["goals"]) == {"engine_mfu", "tokens_per_s_ratio"}

    b = by["attention"]
    if "skipped" not in b:  # vlpretrain.models.attention present: every kind ran or said why not
        assert set(b["kinds"]) == {"flex", "varlen", "sdpa_mask", "causal"}
        for kind in ("varlen", "sdpa_mask", "causal"):
            assert "fwd_bwd_ms" in b["kinds"][kind], b["kinds"][kind]
        assert b["kinds"]["varlen"]["max_abs_diff_out"] < 1e-4  # same function as the dense mask (fp32)
        assert "fwd_ms" in b["kinds"]["flex"] or "fwd_bwd_ms" in b["kinds"]["flex"]

    c = by["plan_memory"]
    assert c["predicted_peak_gib"] > 0 and c["measured_peak_allocated_gib"] is None  # no CUDA statistics here

    d = by["te"]
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        assert d["skipped"] == "transformer-engine not installed"


def test_gpu_check_budget_guard():
    """A run whose time budget is spent before the checks start prints a 'skipped' line for each, then the
    summary naming them."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-smoke", "--budget-s", "0.01"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by = {d["check"]: d for d in map(json.loads, proc.stdout.splitlines())}
    assert list(by) == CHECKS
    for name in ("stage2", "attention", "plan_memory", "te"):
        assert "over the run's time budget" in by[name]["skipped"]
    assert by["summary"]["skipped_or_stopped"] == ["stage2", "attention", "plan_memory", "te"]
