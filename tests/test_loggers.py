"""tensorboard and wandb (offline) receive the scalars of metrics.jsonl and the eval results; eval.jsonl is
rewound on resume like metrics.jsonl. The logger tests run where the packages are installed (test extras)."""
from __future__ import annotations

import json

import pytest
from conftest import TINY

from vlpretrain.config import load_config
from vlpretrain.train.metrics import MetricsLogger, scalars

RESULTS = {"mcppl": {"accuracy": 0.5, "by_type": {"colour": 0.75, "shape": 0.25}, "n": 4},
           "text": {"bits_per_byte": 1.9, "perplexity": 12.3, "tokens": 100}}


def _record(step: int) -> dict:
    return {"step": step, "loss": 2.0 + step, "modality": "text" if step != 2 else "multimodal", "lr": 1e-3,
            "grad_norm": 1.0, "tokens": 10, "tokens_per_s": 5.0, "step_time_s": 0.1, "mfu": 0.1,
            "model_tflops": 0.1, "samples_digest": "ab", "source_counts": {"corpus": step, "ocr": 1},
            "bad_samples": {}, "bad_images": 0, "skipped_samples": 0}


def _log_run(run, *overrides: str) -> dict:
    cfg = load_config(TINY / "stage2.yaml", [f"train.run_dir={run}", "logging.log_interval=1000", *overrides])
    logger = MetricsLogger(cfg, run, 3)
    sent: dict = {}  # what reached wandb's run.log (which then writes it to the offline run file)
    if logger._wandb is not None:
        real_log = logger._wandb.log

        def spy(values, step=None, **kw):
            sent.update(values)
            return real_log(values, step=step, **kw)

        logger._wandb.log = spy
    for s in (1, 2, 3):
        logger.log(_record(s))
    logger.log_eval(3, RESULTS)
    logger.close()
    return sent


def test_scalars_flatten_every_number():
    got = scalars(_record(2))
    assert got["loss"] == 4.0 and got["loss/multimodal"] == 4.0 and "loss/text" not in got
    assert got["source_counts/corpus"] == 2 and "samples_digest" not in got and "step" not in got
    ev = scalars({"step": 3, "mcppl_accuracy": 0.5, "mcppl_by_type": {"colour": 0.75}}, "eval/")
    assert ev == {"eval/mcppl_accuracy": 0.5, "eval/mcppl_by_type/colour": 0.75}


def test_tensorboard_gets_metrics_and_eval(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_run(tmp_path, "logging.tensorboard=true")
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = set(scalars(_record(1))) | set(scalars(_record(2))) | {"eval/mcppl_accuracy",
                                                                   "eval/mcppl_by_type/colour", "eval/text_bpb"}
    assert want <= tags, want - tags
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 3.0), (2, 4.0), (3, 5.0)]
    assert [(e.step, e.value) for e in acc.Scalars("loss/text")] == [(1, 3.0), (3, 5.0)]
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("eval/text_bpb")] == [(3, 1.9)]
    ev = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert ev[0]["step"] == 3 and ev[0]["mcppl_by_type"]["colour"] == 0.75


def test_wandb_offline_gets_metrics_and_eval(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = _log_run(tmp_path, "logging.wandb=true")
    for key, value in {"loss": 5.0, "loss/text": 5.0, "loss/multimodal": 4.0, "source_counts/corpus": 3,
                       "eval/mcppl_accuracy": 0.5, "eval/mcppl_by_type/colour": 0.75, "eval/text_ppl": 12.3}.items():
        assert summary.get(key) == pytest.approx(value), key
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_resume_rewinds_eval_jsonl(tmp_path):
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"step": s, "mcppl_accuracy": 0.1}) + "\n"
                                                 for s in (2, 4, 6)) + '{"step": 8, "mcppl')
    cfg = load_config(TINY / "stage2.yaml", [f"train.run_dir={tmp_path}"])
    MetricsLogger(cfg, tmp_path, 10, resume_step=4).close()
    assert [json.loads(x)["step"] for x in (tmp_path / "eval.jsonl").read_text().splitlines()] == [2, 4]
