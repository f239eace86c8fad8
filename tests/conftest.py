"""Shared fixtures: one small demo dataset per session, the tiny configs, tokenizer and helpers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from anywhere without installing the package
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CONFIGS = REPO / "configs"
TINY = CONFIGS / "tiny"
DEMO_SCALE = 0.05


def run_script_ok(code: str, timeout: int = 300) -> None:
    """Run ``code`` in a fresh Python process (one thread, the repository importable) and require it to exit 0
    with "ok" as its last output line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# Markers by module, in one place (pytest -m "not multiprocess", -m slurm, ...): modules that launch several
# ranks (torchrun or a process per rank over gloo; run one at a time on a small machine), that need the Slurm
# cluster or headless Chromium (they skip with the reason without it); "slow": tests over ~30 s on 2 cores.
MODULE_MARKS = {
    "test_eval_layouts": ("multiprocess",), "test_mixed_precision": ("multiprocess",),
    "test_multinode": ("multiprocess",), "test_parallel_equivalence": ("multiprocess",),
    "test_parallel_train": ("multiprocess",), "test_profiling": ("multiprocess",), "test_resume": ("multiprocess",),
    "test_weights_stream": ("multiprocess",), "test_slurm": ("slurm", "multiprocess"),
}
TEST_MARKS = {"test_every_figure_loads_in_chromium": ("browser",),
              "test_dp2_rollback_equals_a_clean_run": ("multiprocess",),
              "test_lost_rank_is_named_by_the_survivor": ("multiprocess",)}
SLOW = ("test_resume_across_layouts", "test_eval_in_layouts_equals_single_process",
        "test_resume_in_the_same_3d_layout_is_bitwise", "test_pretrained_parts_load_into_layouts_and_stream_back_out",
        "test_preempted_job_requeues_and_resumes", "test_layouts_match_single_process",
        "test_layouts_agree_within_bf16_noise")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for mark in MODULE_MARKS.get(item.module.__name__.rpartition(".")[2], ()):
            item.add_marker(mark)
        for mark in TEST_MARKS.get(item.originalname, ()):
            item.add_marker(mark)
        if item.originalname in SLOW:
            item.add_marker("slow")


@pytest.fixture(autouse=True)
def _no_leaked_signal_handlers():
    """A test that ran the trainer or the CLI in this process must leave the signal handlers as it found them
    (a handler left behind is inherited by every process the suite forks later)."""
    import signal

    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
    before = {s: signal.getsignal(s) for s in watched}
    yield
    leaked = [signal.Signals(s).name for s in watched if signal.getsignal(s) != before[s]]
    for s in watched:
        signal.signal(s, before[s])
    assert not leaked, f"the test left signal handlers installed: {leaked}"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threading only adds synchronisation cost (badly so on a busy CPU). A module opts in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deterministic demo dataset at scale 0.05 (about 1 s), shared by every test module."""
    from data_tools import generate_demo

    out = tmp_path_factory.mktemp("demo_data")
    generate_demo(out, seed=0, scale=DEMO_SCALE, verbose=False)
    return out


@pytest.fixture(scope="session")
def tokenizer(demo_dir: Path):
    from vlpretrain.data.tokenizer import TextTokenizer

    return TextTokenizer(demo_dir / "tokenizer.json")


@pytest.fixture(scope="session")
def tiny_cfg():
    """The tiny stage-2 config (model section from configs/tiny/model.yaml)."""
    from vlpretrain.config import load_config

    return load_config(TINY / "stage2.yaml")


@pytest.fixture
def tiny_train_cfg(demo_dir: Path, tmp_path: Path):
    """``make(stage, *overrides)``: a tiny-stage config pointed at the demo data and a fresh run dir, no eval,
    no previous stage; small enough to train a step in a fraction of a second on one CPU thread."""
    from vlpretrain.config import load_config

    def make(stage: int = 2, *overrides: str, run: str = "run"):
        base = [f"data.root={demo_dir}", f"train.run_dir={tmp_path / run}", "train.init_from=",
                "train.eval_file=", "train.global_batch_size=8", "train.micro_batch_size=4",
                "train.seq_len=128", "logging.log_interval=1000"]
        return load_config(TINY / f"stage{stage}.yaml", base + list(overrides))

    return make
