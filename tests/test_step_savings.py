"""Work a step can skip without changing what it computes: frozen towers' outputs reused per image
(``train.frozen_tower_cache_mb``, train/tower_cache.py) and the vocabulary head on supervised positions only
(``train.logits_at_labels``). Each against the plain step on the same data; layouts in
test_parallel_equivalence (the ``*_tower_cache`` cases; its single-process reference scores supervised positions
only while its tp / pp layouts score all of them)."""
from __future__ import annotations

import torch
from conftest import TINY

from vlpretrain.config import load_config
from vlpretrain.data.synthetic import synthetic_microbatches
from vlpretrain.models.vlm import build_model
from vlpretrain.parallel.engine import ParallelModel
from vlpretrain.parallel.mesh import ParallelContext, resolve_layout
from vlpretrain.train import tower_cache


def _model(stage: int, *overrides: str) -> tuple:
    cfg = load_config(TINY / f"stage{stage}.yaml", ["model.n_layers=2", "train.global_batch_size=4",
                                                    "train.micro_batch_size=2", *overrides])
    model = ParallelModel(cfg, ParallelContext(resolve_layout(cfg, 1), torch.device("cpu"), None))
    return cfg, model


def _step(model: ParallelModel, mbs: list, n: int) -> tuple[float, dict]:
    loss = model.forward_backward(mbs, n)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    for p in model.trainable_parameters():
        p.grad = None
    return loss, grads


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


def test_frozen_tower_cache_reuses_outputs_without_changing_the_step():
    torch.manual_seed(0)
    cfg, plain = _model(3)
    _, cached = _model(3)
    cache = tower_cache.install(cached.modules, 64)
    assert sorted(cache.names.values()) == ["sam"]  # stage 3: SigLIP learns, so it is never cached
    mbs, n = synthetic_microbatches(cfg, seed=1, images_per_sample=2)
    images = sum(int((mb.tokens == cfg.model.image_token_id).sum()) for mb in mbs) // cfg.model.image_tokens
    assert images > 0
    ref = _step(plain, mbs, n)
    first = _step(cached, mbs, n)  # fills the cache
    assert (cache.hits, cache.misses) == (0, images)
    second = _step(cached, mbs, n)  # every image again: SAM does not run
    assert cache.hits == images and cache.stats()["images"] <= images
    for loss, grads in (first, second):
        assert abs(loss - ref[0]) <= 1e-6 * abs(ref[0])
        _close(grads, ref[1])


def test_cache_keys_on_pixels_and_keeps_to_its_budget():
    cfg, model = _model(2)
    cache = tower_cache.install(model.modules, 64)
    assert sorted(cache.names.values()) == ["sam", "siglip"]  # stage 2: both towers frozen
    sam = model.modules[0].embed.vision.sam
    imgs = torch.rand(3, 3, cfg.model.sam.image_size, cfg.model.sam.image_size)
    with torch.no_grad():
        direct = sam(imgs)
        first = cache(sam, imgs)
        changed = imgs.clone()
        changed[1, 0, 0, 0] += 0.5  # one pixel: a new image
        again = cache(sam, changed)
    torch.testing.assert_close(first, direct)
    assert (cache.hits, cache.misses) == (2, 4)
    torch.testing.assert_close(again[1], sam(changed[1:2])[0].detach())
    one = direct[0].numel() * direct.element_size()
    small = tower_cache.FrozenTowerCache({"sam": sam}, budget_mb=2.5 * one / 2**20)
    with torch.no_grad():
        small(sam, imgs)
    assert len(small.store) == 2 and small.bytes <= small.budget  # the third did not fit: computed, not kept


def test_no_cache_where_every_tower_learns_or_the_budget_is_zero():
    _, model = _model(3, "train.trainable=[siglip,sam,adaptor,llm]")
    assert tower_cache.install(model.modules, 64) is None
    _, model = _model(2)
    assert tower_cache.install(model.modules, 0) is None
    assert model.modules[0].embed.vision.run_tower is None


def test_logits_at_selects_positions_and_keeps_the_loss_and_gradients():
    cfg = load_config(TINY / "stage3.yaml", ["model.n_layers=2"])
    model = build_model(cfg.model, seed=0)
    tokens = torch.randint(3, cfg.model.vocab_size, (2, 24))
    keep = torch.zeros(2, 24, dtype=torch.bool)
    keep[0, 5:9] = keep[1, 20:] = True
    with torch.no_grad():
        full, part = model(tokens), model(tokens, logits_at=keep)
    assert part.shape == (1, 8, cfg.model.vocab_size)
    torch.testing.assert_close(part[0], full[keep], rtol=1e-5, atol=1e-6)

    mbs, n = synthetic_microbatches(load_config(TINY / "stage3.yaml", [
        "model.n_layers=2", "train.global_batch_size=4", "train.micro_batch_size=2"]), seed=2)
    results = []
    for at_labels in ("true", "false"):
        torch.manual_seed(0)
        _, m = _model(3, f"train.logits_at_labels={at_labels}")
        assert m.logits_at_labels == (at_labels == "true")
        results.append(_step(m, mbs, n))
    assert abs(results[0][0] - results[1][0]) <= 1e-6 * abs(results[1][0])
    _close(results[0][1], results[1][1])


def test_trim_padding_cuts_microbatches_to_their_longest_row_and_keeps_the_step(tiny_train_cfg, tokenizer):
    from vlpretrain.data.loader import DataPipeline
    from vlpretrain.data.placement import TRIM_MULTIPLE

    cfg = tiny_train_cfg(3, "model.n_layers=2", "train.seq_len=192")
    full_cfg = tiny_train_cfg(3, "model.n_layers=2", "train.seq_len=192", "data.trim_padding=false")
    trimmed, full = DataPipeline(cfg, tokenizer), DataPipeline(full_cfg, tokenizer)
    widths = []
    for _ in range(3):
        plan = trimmed.plans.plan()
        a, b = trimmed.build(plan), full.build(full.plans.plan())
        assert a.samples == b.samples
        for ma, mb in zip(a.microbatches, b.microbatches):
            w = ma.tokens.shape[1]
            widths.append(w)
            longest = int((mb.tokens != tokenizer.pad_id).sum(1).max())
            assert w % TRIM_MULTIPLE == 0 and longest <= w < longest + TRIM_MULTIPLE, (w, longest)
            assert mb.tokens.shape[1] == 192
            assert torch.equal(ma.tokens, mb.tokens[:, :w]) and torch.equal(ma.labels, mb.labels[:, :w])
            assert (mb.tokens[:, w:] == tokenizer.pad_id).all() and (mb.labels[:, w:] == -100).all()
    assert max(widths) < 192  # the SFT rows are far shorter than seq_len here
    # the same step's loss and gradients
    results = []
    for c, batch in ((cfg, a), (full_cfg, b)):
        torch.manual_seed(0)
        m = ParallelModel(c, ParallelContext(resolve_layout(c, 1), torch.device("cpu"), None))
        results.append(_step(m, batch.microbatches, batch.num_label_tokens))
    assert abs(results[0][0] - results[1][0]) <= 1e-6 * abs(results[1][0])
    _close(results[0][1], results[1][1])
    # a pipeline keeps seq_len: its stages exchange fixed shapes
    piped = DataPipeline(tiny_train_cfg(3, "model.n_layers=2", "train.seq_len=192", "parallel.pp=2"), tokenizer)
    assert all(mb.tokens.shape[1] == 192 for mb in piped.build(piped.plans.plan()).microbatches)
