"""Training: LR schedules, a short tiny run whose loss goes down, metrics.jsonl, gradient-accumulation
equivalence, and the stage 1 -> stage 3 hand-over (weights loaded exactly, fresh optimizer, SAM frozen)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS
from safetensors.torch import load_file

from vlpretrain.checkpoint.weights import find_weights, load_weights, read_weights
from vlpretrain.config import TrainConfig, load_config
from vlpretrain.models.vlm import build_model, part_of
from vlpretrain.train.optim import build_optimizer, lr_multiplier
from vlpretrain.train.trainer import train

METRIC_KEYS = {"step", "loss", "modality", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s", "mfu",
               "model_tflops", "consumed_samples", "rank_cost_imbalance", "rank_cost_imbalance_contiguous"}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    """Full weights of the run's final checkpoint, or of an intermediate one (DCP shards)."""
    if step is None:
        return load_file(str(find_weights(run_dir)))
    return read_weights(run_dir / "checkpoints" / f"step_{step:08d}")


# ---------------------------------------------------------------------------------------------------------------
# LR schedules (lr_multiplier takes the 0-based optimizer step)


@pytest.mark.parametrize("step, expected", [
    (0, 0.1), (4, 0.5), (9, 1.0),  # linear warm-up over 10 steps: (step + 1) / 10
    (10, 1.0),  # cosine starts at the peak
    (40, 0.1 + 0.9 * 0.75),  # progress 1/3: cos(pi/3) = 0.5
    (55, 0.55),  # half way: (1 + floor) / 2
    (70, 0.1 + 0.9 * 0.25),  # progress 2/3
    (99, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90))),
    (100, 0.1), (150, 0.1),  # the floor, also past the end
])
def test_cosine_with_warmup(step, expected):
    cfg = TrainConfig(steps=100, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(step, cfg) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("warmup, step, expected", [
    (0, 0, 1.0), (0, 79, 1.0), (0, 80, 0.316), (0, 89, 0.316), (0, 90, 0.316 ** 2), (0, 99, 0.099856),
    (20, 0, 0.05), (20, 9, 0.5), (20, 19, 1.0), (20, 20, 1.0), (20, 80, 0.316), (20, 95, 0.099856),
])
def test_step_schedule(warmup, step, expected):
    cfg = TrainConfig(steps=100, warmup_steps=warmup, lr_schedule="step", step_milestones=[0.8, 0.9], step_gamma=0.316)
    assert lr_multiplier(step, cfg) == pytest.approx(expected, abs=1e-12)


def test_step_schedule_of_the_7b_stage2_config():
    tc = load_config(CONFIGS / "deepseek-vl-7b" / "stage2.yaml").train
    assert (tc.steps, tc.warmup_steps, tc.lr_schedule, tc.lr) == (42000, 2000, "step", 4.2e-5)
    expected = {0: 1 / 2000, 999: 0.5, 1999: 1.0, 2000: 1.0, 33599: 1.0, 33600: 0.316, 37799: 0.316,
                37800: 0.099856, 41999: 0.099856}
    for step, mult in expected.items():
        assert lr_multiplier(step, tc) == pytest.approx(mult, abs=1e-12), step
        assert tc.lr * lr_multiplier(step, tc) == pytest.approx(4.2e-5 * mult, rel=1e-12)


def test_step_milestone_fraction_is_not_truncated():
    cfg = TrainConfig(steps=90, lr_schedule="step", step_milestones=[0.7], step_gamma=0.5)
    assert lr_multiplier(62, cfg) == 1.0  # milestone = 0.7 x 90 = step 63
    assert lr_multiplier(63, cfg) == 0.5


@pytest.mark.parametrize("step, expected", [(0, 0.2), (3, 0.8), (4, 1.0), (5, 1.0), (1000, 1.0)])
def test_constant_schedule(step, expected):
    cfg = TrainConfig(steps=50, warmup_steps=5, lr_schedule="constant")
    assert lr_multiplier(step, cfg) == pytest.approx(expected, abs=1e-12)
    assert lr_multiplier(step, TrainConfig(steps=50, lr_schedule="constant")) == 1.0


def test_scheduler_drives_the_optimizer_lr():
    cfg = TrainConfig(steps=12, warmup_steps=2, lr=2e-3, lr_schedule="step", step_milestones=[0.5, 0.75],
                      step_gamma=0.1)
    model = torch.nn.Linear(3, 2)
    opt, sched = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1e-3, 2e-3, 2e-3, 2e-3, 2e-3, 2e-3, 2e-4, 2e-4, 2e-4, 2e-5, 2e-5, 2e-5]
    assert seen == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# a short run


def test_short_run_loss_goes_down_and_metrics(tiny_train_cfg):
    steps, lr = 12, 3.0e-3
    cfg = tiny_train_cfg(2, f"train.steps={steps}", f"train.lr={lr}", "train.lr_schedule=constant",
                         "train.warmup_steps=0", "data.language_ratio.warmup_steps=0", "train.seq_len=256",
                         "data.language_ratio.end=0.5")  # alternate text and multimodal steps; packed rows
    summary = train(cfg)
    run_dir = Path(cfg.train.run_dir)
    rows = _metrics(run_dir)
    assert len(rows) == steps
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    assert summary["first_loss"] == losses[0] and summary["final_loss"] == losses[-1]
    # the untrained model starts near ln(vocab)
    assert abs(losses[0] - math.log(cfg.model.vocab_size)) < 1.0
    for i, r in enumerate(rows, start=1):
        assert METRIC_KEYS <= set(r), METRIC_KEYS - set(r)
        assert r["step"] == i
        consumed = r["consumed_samples"] - (rows[i - 2]["consumed_samples"] if i > 1 else 0)
        assert consumed >= 8 and consumed == sum(r["source_counts"].values())  # >= one document per row
        assert r["lr"] == pytest.approx(lr, rel=1e-12)
        assert r["modality"] in ("text", "multimodal")
        assert 0 < r["tokens"] <= 8 * 256
        assert r["step_time_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_time_s"])
        assert r["grad_norm"] > 0 and math.isfinite(r["grad_norm"])
        assert r["model_tflops"] > 0 and r["mfu"] == pytest.approx(r["model_tflops"] / 1.0)  # CPU peak 1 TFLOP/s
        assert (r["images"] > 0) == (r["modality"] == "multimodal")
    assert {r["modality"] for r in rows} == {"text", "multimodal"}
    assert summary["skipped_samples"] == {"interleaved": 0, "captions": 0, "ocr": 0, "sft": 0, "text": 0}
    assert (run_dir / "summary.json").is_file() and (run_dir / "config.yaml").is_file()
    assert find_weights(run_dir).name == "model.safetensors"
    assert load_config(run_dir / "config.yaml") == cfg


def test_metrics_lr_follows_the_schedule(tiny_train_cfg):
    cfg = tiny_train_cfg(2, "train.steps=5", "train.lr=1.0e-3", "train.warmup_steps=2", "train.lr_schedule=step",
                         "train.step_milestones=[0.6]", "train.step_gamma=0.5")
    train(cfg)
    lrs = [r["lr"] for r in _metrics(Path(cfg.train.run_dir))]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4, 5e-4], rel=1e-12)


def test_training_steps_the_scheduler_build_optimizer_returns(tiny_train_cfg, monkeypatch):
    """The trainer trains with build_optimizer's optimizer and scheduler as returned (nothing rebuilt): every
    update uses the logged LR, also after a resume from a step where the cosine schedule is below 1."""
    from vlpretrain.train import trainer

    built, seen = [], []  # (optimizer, scheduler) pairs; the LR of every optimizer step

    def recording(params, tc):
        opt, sched = build_optimizer(params, tc)
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
        built.append((opt, sched))
        return opt, sched

    monkeypatch.setattr(trainer, "build_optimizer", recording)
    common = ["train.steps=4", "train.lr=1.0e-3", "train.warmup_steps=1", "train.lr_schedule=cosine",
              "checkpoint.interval=2", "checkpoint.keep_last=2"]
    cfg = tiny_train_cfg(2, *common, run="full")
    train(cfg)
    full = _metrics(Path(cfg.train.run_dir))
    lrs = [r["lr"] for r in full]
    assert lrs == [1.0e-3 * lr_multiplier(i, cfg.train) for i in range(4)] and lrs[2] < 1.0e-3
    assert seen == lrs
    assert [sched.last_epoch for _, sched in built] == [4]

    built.clear()
    seen.clear()
    step2 = Path(cfg.train.run_dir) / "checkpoints" / "step_00000002"
    cfg = tiny_train_cfg(2, *common, f"checkpoint.resume={step2}", run="resumed")
    train(cfg)
    resumed = _metrics(Path(cfg.train.run_dir))
    assert [r["step"] for r in resumed] == [3, 4] and [r["lr"] for r in resumed] == lrs[2:]
    assert [lr for lr in seen if lr != 0.0] == lrs[2:]  # the checkpoint load steps a fresh optimizer at lr 0
    assert [sched.last_epoch for _, sched in built] == [4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]  # step 4's loss follows step 3's LR


# ---------------------------------------------------------------------------------------------------------------
# gradient accumulation


def test_gradient_accumulation_equivalence(tiny_train_cfg):
    """One step over 8 samples as 1 x 8, 2 x 4 and 4 x 2 microbatches: the same loss and the same update.

    The loss is normalised by the global batch's supervised token count, so accumulation is exact up to the
    order of float32 sums (loss ~7.6, float32 spacing ~5e-7: 1e-6 is about two ulps). Adam's first step moves
    each weight by ~lr x sign(grad) (lr = 1e-3), so a wrongly scaled gradient or a sign flip would show as
    differences of 1e-3, far above the 1e-6 tolerance on the weights. Adam's first step is lr x g / (|g| + eps):
    for a weight whose gradient is ~0 it amplifies summation-order noise by up to lr / eps, so eps is raised
    to 1e-6 (that bound becomes 1e3 x ~1e-10 noise), well below the tolerance.
    """
    common = ["train.steps=1", "train.lr=1.0e-3", "train.eps=1.0e-6", "train.warmup_steps=0",
              # a multimodal step: images go through the towers and the adaptor
              "data.language_ratio.start=0.0", "data.language_ratio.end=0.0"]
    results = {}
    for micro in (8, 4, 2):
        cfg = tiny_train_cfg(2, *common, f"train.micro_batch_size={micro}", run=f"ga{micro}")
        summary = train(cfg)
        rows = _metrics(Path(cfg.train.run_dir))
        assert rows[0]["modality"] == "multimodal" and rows[0]["images"] > 0
        results[micro] = (summary["first_loss"], rows[0]["grad_norm"], _weights(Path(cfg.train.run_dir)))
    loss8, gn8, w8 = results[8]
    init = build_model(load_config(CONFIGS / "tiny" / "stage2.yaml").model, "cpu", seed=0).state_dict()
    moved = [k for k in w8 if not torch.equal(w8[k], init[k])]
    assert moved and {part_of(k) for k in moved} == {"adaptor", "llm"}
    for micro in (4, 2):
        loss, gn, w = results[micro]
        assert loss == pytest.approx(loss8, abs=1e-6, rel=0)
        assert gn == pytest.approx(gn8, rel=1e-5)
        assert w.keys() == w8.keys()
        for k in w8:
            torch.testing.assert_close(w[k], w8[k], atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# stage 1 -> stage 3


def test_stage1_to_stage3(tiny_train_cfg):
    lr3 = 1.0e-3
    cfg1 = tiny_train_cfg(1, "train.steps=2", "train.warmup_steps=0", run="s1")
    train(cfg1)
    run1 = Path(cfg1.train.run_dir)
    w1 = _weights(run1)
    # stage 1 trained only the adaptor: everything else is the seed-0 init
    init0 = build_model(cfg1.model, "cpu", seed=0).state_dict()
    changed = {part_of(k) for k in w1 if not torch.equal(w1[k], init0[k])}
    assert changed == {"adaptor"}

    # stage 3 from the stage-1 run dir, with another seed so a missed load would be visible
    cfg3 = tiny_train_cfg(3, f"train.init_from={run1}", "train.steps=3", "train.seed=1", f"train.lr={lr3}",
                          "train.lr_schedule=constant", "train.warmup_steps=0", "checkpoint.interval=1",
                          "checkpoint.keep_last=3", "train.eps=1.0e-16", run="s3")
    assert cfg3.train.stage == 3 and cfg3.train.init_from == str(run1)

    # the loading path the trainer uses gives exactly the stage-1 weights
    fresh = build_model(cfg3.model, "cpu", seed=1)
    assert not torch.equal(fresh.state_dict()["embed.adaptor.layers.1.weight"], w1["embed.adaptor.layers.1.weight"])
    assert load_weights(fresh, run1) == []
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, w1[k]), k

    train(cfg3)
    run3 = Path(cfg3.train.run_dir)
    rows = _metrics(run3)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["lr"] == pytest.approx(lr3, rel=1e-12) and rows[0]["consumed_samples"] == 8
    after1, final = _weights(run3, 1), _weights(run3)

    # a fresh AdamW's first update is lr * g / (|g| + eps), i.e. +-lr for every weight with a nonzero gradient
    # (eps is set to 1e-16 as SigLIP's clipped grads are ~1e-6), measured from the stage-1 weights: this checks
    # both the load and that no optimizer state came along (Adam moments from earlier steps would break +-lr)
    for part in ("adaptor", "siglip"):
        keys = [k for k in w1 if part_of(k) == part]
        delta = torch.cat([(after1[k] - w1[k]).flatten() for k in keys]).abs() / lr3
        moved = delta[delta > 0]
        assert moved.numel() > 0.9 * delta.numel(), part
        assert (moved < 1.0 + 1e-3).all(), part
        assert (moved > 0.9999).float().mean() > 0.99, (part, moved.median())
        assert moved.median() == pytest.approx(1.0, abs=1e-5), part

    # SAM is frozen in stage 3: bit-identical to the stage-1 weights after every step, and not the seed-1 init
    sam = [k for k in w1 if part_of(k) == "sam"]
    assert sam
    init1 = build_model(cfg3.model, "cpu", seed=1).state_dict()
    for k in sam:
        assert torch.equal(after1[k], w1[k]) and torch.equal(final[k], w1[k]), k
    assert any(not torch.equal(init1[k], w1[k]) for k in sam)
    # and the trainable parts did move
    for part in ("adaptor", "llm", "siglip"):
        assert any(not torch.equal(final[k], w1[k]) for k in w1 if part_of(k) == part), part


def test_eval_at_start_is_the_untrained_model_and_eval_at_end_can_be_off(tiny_train_cfg, capsys):
    """The demo's "before": stage 1 evaluates its starting weights (the random init) at step 0, the same numbers
    as ``vlpretrain eval`` of that init, and skips the end-of-run evaluation."""
    from vlpretrain.cli import main

    cfg = tiny_train_cfg(1, "train.steps=2", "train.eval_file=eval_mc.jsonl", "train.eval_at_start=true",
                         "train.eval_at_end=false", run="s1")
    train(cfg)
    run = Path(cfg.train.run_dir)
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0]
    assert "eval" not in json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--config", str(run / "config.yaml")]) == 0  # no --weights: the seed's init
    direct = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert direct["accuracy"] == evals[0]["mcppl_accuracy"] and direct["by_type"] == evals[0]["mcppl_by_type"]
