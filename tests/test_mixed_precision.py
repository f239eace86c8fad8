"""One mixed-precision policy in every layout (``train.dtype: bf16``): FSDP2's MixedPrecisionPolicy (bf16
compute, fp32 master weights, optimizer state and gradient reduction), over a 1-rank mesh at dp = 1.

(1,1,1), (2,1,1) and (1,1,2) run the same code path and give losses within bf16 noise of each other; a run saved
at dp = 2 and resumed at dp = 1 continues on the same curve. The tolerance is set from measured noise and is
checked to be far below what a real change does (fp32 vs bf16, a different learning rate).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import REPO
from test_resume import STEPS, _metrics, _resume_copy, _train

# untrimmed microbatches, no frozen-tower cache and rows in plan order (data.balance: none), so every layout
# trains the same rows in the same microbatches: trimmed microbatches are as wide as the rows each layout's ranks
# group together, cached tower outputs come from whichever batch first held the image, a balanced placement
# groups other rows per rank, and bf16 rounding over any of these moves the losses by more than the layout noise
# these tolerances were set from (another grouping: 1.7e-4 on a loss, measured). fp32 tests cover those features.
BF16 = ("train.dtype=bf16", "data.trim_padding=false", "train.frozen_tower_cache_mb=0", "data.balance=none")
# bf16 noise between layouts, relative: observed 1.1e-5 (loss) and 1.4e-4 (grad norm) over 4 steps; fp32 instead
# of bf16 moves them by 9.4e-5 and 7.7e-3 (test_tolerance_is_meaningful)
LOSS_REL, GNORM_REL = 4e-5, 1.5e-3


def _losses(run_dir, key: str = "loss") -> list[float]:
    m = _metrics(run_dir)
    return [m[s][key] for s in sorted(m)]


@pytest.fixture(scope="module")
def bf16_runs(demo_dir, tmp_path_factory):
    runs = {}
    for name, nproc, layout in [("111", 1, []), ("211", 2, ["parallel.dp=2"]),
                                ("112", 2, ["parallel.pp=2", "parallel.layer_split=uniform"])]:
        run = tmp_path_factory.mktemp(f"bf16_{name}")
        proc = _train(run, demo_dir, nproc, *BF16, *layout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = run
    return runs


def test_layouts_agree_within_bf16_noise(bf16_runs):
    ref = _losses(bf16_runs["111"])
    assert len(ref) == STEPS
    for name in ("211", "112"):
        got = _losses(bf16_runs[name])
        assert got == pytest.approx(ref, rel=LOSS_REL), (name, got, ref)
        got, want = _losses(bf16_runs[name], "grad_norm"), _losses(bf16_runs["111"], "grad_norm")
        assert got == pytest.approx(want, rel=GNORM_REL), (name, got, want)


def test_resume_from_dp2_into_dp1_stays_on_the_curve(bf16_runs, demo_dir, tmp_path):
    _resume_copy(bf16_runs["211"], tmp_path, 2)
    proc = _train(tmp_path, demo_dir, 1, *BF16, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    got = _metrics(tmp_path)
    for ref_name in ("211", "111"):
        ref = _metrics(bf16_runs[ref_name])
        for s in (3, 4):
            assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=LOSS_REL), (ref_name, s)
            assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=GNORM_REL), (ref_name, s)
            assert got[s]["samples_digest"] == ref[s]["samples_digest"]


def test_tolerance_is_meaningful(bf16_runs, demo_dir, tmp_path):
    """fp32 on the same data differs from bf16 by more than the tolerances: the checks above would see a
    layout that silently ran in another precision."""
    proc = _train(tmp_path, demo_dir, 1, "train.dtype=fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("loss", "grad_norm"):
        fp32, bf16 = _losses(tmp_path, key), _losses(bf16_runs["111"], key)
        worst = max(abs(a - b) / abs(b) for a, b in zip(fp32, bf16))
        layouts = max(abs(a - b) / abs(b) for name in ("211", "112")
                      for a, b in zip(_losses(bf16_runs[name], key), bf16))
        print(f"max rel {key} difference: bf16 layouts {layouts:.2e}, fp32 vs bf16 {worst:.2e}")
        assert layouts < {"loss": LOSS_REL, "grad_norm": GNORM_REL}[key] < worst


_POLICY = textwrap.dedent("""
    import torch
    from vlpretrain.config import load_config
    from vlpretrain.data.synthetic import synthetic_microbatches
    from vlpretrain.parallel.engine import ParallelModel
    from vlpretrain.parallel.mesh import init_parallel

    cfg = load_config({stage2!r}, ["train.dtype=bf16", "train.seq_len=64", "train.global_batch_size=2",
                                   "train.micro_batch_size=2"])
    model = ParallelModel(cfg, init_parallel(cfg, torch.device("cpu")))
    seen = []
    block = next(iter(model.modules[0].layers.values()))
    block.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    mbs, n = synthetic_microbatches(cfg, seed=0, images_per_sample=1, documents=1)
    model.forward_backward(mbs, n)
    params = model.trainable_parameters()
    print(seen[0], {{p.dtype for p in params}}, {{p.grad.dtype for p in params}},
          type(params[0]).__name__)
""")


def test_single_process_bf16_is_fsdp_mixed_precision(tmp_path):
    """At dp = 1 the blocks compute in bf16 while parameters and gradients stay fp32 (FSDP's policy)."""
    script = tmp_path / "policy.py"
    script.write_text(_POLICY.format(stage2=str(REPO / "configs" / "tiny" / "stage2.yaml")))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["torch.bfloat16", "{torch.float32}", "{torch.float32}", "DTensor"]
