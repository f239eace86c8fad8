"""Stage-2 sequence packing: the packer (positions, doc ids, no split documents, padding, first-fit policy,
labels kept verbatim) and the model's document-causal attention (a packed row gives the same logits, loss and
gradients as its documents run one by one; doc_ids=None keeps the plain causal path bit for bit)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from dist.equivalence_worker import IMAGE_ID, tiny_hybrid

from vlpretrain.config import config_from_dict
from vlpretrain.data.encoding import IGNORE, EncodedSample, SampleEncoder
from vlpretrain.data.packing import PackedRow, check_sample, pack_samples, to_tensors
from vlpretrain.models.attention import dense_document_causal_mask as document_causal_mask
from vlpretrain.models.llm import apply_rotary, rotary_cos_sin
from vlpretrain.models.vlm import build_model

PAD = 3


def _sample(n: int, n_images: int = 0, image_tokens: int = 4, seed: int = 0, tag: str = "") -> EncodedSample:
    """n tokens of random text with n_images placeholder runs (after the first token, two apart); labels are the
    next tokens within the sample (image targets ignored), the last one an own "eos" (1) or IGNORE."""
    rng = random.Random(seed)
    ids = [rng.randrange(PAD + 1, 256) for _ in range(n + 1)]
    for k in range(n_images):
        start = 1 + k * (image_tokens + 2)
        assert start + image_tokens < n
        ids[start:start + image_tokens] = [IMAGE_ID] * image_tokens
    ids[-1] = 1 if seed % 2 == 0 else IGNORE
    labels = [IGNORE if t == IMAGE_ID else t for t in ids[1:]]
    return EncodedSample(tokens=ids[:-1], labels=labels, images=[f"{tag or seed}/img{k}.png" for k in range(n_images)])


def _segments(row: PackedRow) -> list[tuple[int, int]]:
    """(start, end) of each document in the row, from doc_ids."""
    out, start = [], 0
    for i in range(1, len(row.doc_ids) + 1):
        if i == len(row.doc_ids) or row.doc_ids[i] != row.doc_ids[i - 1]:
            if row.doc_ids[start] != 0:
                out.append((start, i))
            start = i
    return out


# ---------------------------------------------------------------------------------------------------------------
# packer


def test_row_layout_positions_doc_ids_padding_and_images():
    a, b, c = _sample(5, seed=1), _sample(9, 1, seed=2), _sample(12, 2, seed=3)
    rows = pack_samples([a, b, c], seq_len=32, image_token_id=IMAGE_ID, pad_id=PAD, image_tokens=4)
    assert len(rows) == 1
    r = rows[0]
    assert r.n_docs == 3 and r.used == 26
    for field in (r.tokens, r.labels, r.positions, r.doc_ids):
        assert len(field) == 32
    assert r.positions == list(range(5)) + list(range(9)) + list(range(12)) + [0] * 6
    assert r.doc_ids == [1] * 5 + [2] * 9 + [3] * 12 + [0] * 6
    assert r.tokens == a.tokens + b.tokens + c.tokens + [PAD] * 6
    assert r.labels == a.labels + b.labels + c.labels + [IGNORE] * 6
    assert r.images == b.images + c.images  # placeholder order along the row
    tokens, labels, positions, doc_ids = to_tensors(rows)
    for t in (tokens, labels, positions, doc_ids):
        assert t.shape == (1, 32) and t.dtype == torch.long
    assert doc_ids[0].tolist() == r.doc_ids


def test_first_fit_in_arrival_order():
    lens = [6, 6, 3, 4, 1, 10, 2]
    samples = [_sample(n, seed=i) for i, n in enumerate(lens)]
    rows = pack_samples(samples, seq_len=10, image_token_id=IMAGE_ID, pad_id=PAD)
    # 6 -> r0; 6 -> r1; 3 -> r0 (9); 4 -> r1 (10); 1 -> r0 (10); 10 -> r2; 2 -> r3
    expect = [[0, 2, 4], [1, 3], [5], [6]]
    assert len(rows) == len(expect)
    for row, idx in zip(rows, expect):
        assert row.n_docs == len(idx)
        assert [row.tokens[s:e] for s, e in _segments(row)] == [samples[i].tokens for i in idx]


def test_never_splits_documents_or_images_and_keeps_labels_exactly():
    rng = random.Random(7)
    samples = []
    for i in range(60):
        k = rng.randrange(0, 3)
        samples.append(_sample(rng.randrange(3 + k * 6, 40), k, seed=i))
    seq_len = 48
    rows = pack_samples(samples, seq_len, IMAGE_ID, PAD, image_tokens=4)
    seen = []
    for row in rows:
        assert len(row.tokens) == seq_len
        segs = _segments(row)
        assert [row.doc_ids[s] for s, _ in segs] == list(range(1, row.n_docs + 1))
        # padding only after the last document, nothing but padding there
        end = segs[-1][1]
        assert row.tokens[end:] == [PAD] * (seq_len - end) and row.labels[end:] == [IGNORE] * (seq_len - end)
        assert row.positions[end:] == [0] * (seq_len - end) and row.doc_ids[end:] == [0] * (seq_len - end)
        images = []
        for s, e in segs:
            match = [x for x in samples if x.tokens == row.tokens[s:e] and x.labels == row.labels[s:e]]
            assert match, "a packed document is not one whole sample"
            doc = match[0]
            seen.append(id(doc))
            assert row.positions[s:e] == list(range(e - s))
            # the document's last label is its own final target, never the next document's first token
            assert row.labels[e - 1] == doc.labels[-1]
            images += doc.images
            # image runs are whole: every run of placeholders inside the row is a multiple of 4
            run = 0
            for t in row.tokens[s:e] + [None]:
                if t == IMAGE_ID:
                    run += 1
                else:
                    assert run % 4 == 0
                    run = 0
        assert row.images == images
    assert sorted(seen) == sorted(id(x) for x in samples)  # every sample exactly once


def test_deterministic():
    rng = random.Random(3)
    samples = [_sample(rng.randrange(1, 30), seed=i) for i in range(40)]
    a = pack_samples(samples, 32, IMAGE_ID, PAD)
    b = pack_samples([EncodedSample(list(s.tokens), list(s.labels), list(s.images)) for s in samples], 32,
                     IMAGE_ID, PAD)
    assert a == b


def test_rejects_bad_samples():
    assert pack_samples([_sample(16, seed=0)], 16, IMAGE_ID, PAD)[0].n_docs == 1  # exactly seq_len fits
    with pytest.raises(ValueError, match="sample 1: .*does not fit"):
        pack_samples([_sample(4, seed=0), _sample(17, seed=1)], 16, IMAGE_ID, PAD)
    with pytest.raises(ValueError, match="does not fit"):
        check_sample(_sample(17), 16, IMAGE_ID)
    with pytest.raises(ValueError, match="empty"):
        check_sample(EncodedSample([], [], []), 16, IMAGE_ID)
    with pytest.raises(ValueError, match="labels"):
        check_sample(EncodedSample([5, 6], [6], []), 16, IMAGE_ID)
    bad = _sample(12, 1, seed=0)
    bad.images = []
    with pytest.raises(ValueError, match="placeholder"):
        check_sample(bad, 16, IMAGE_ID)
    with pytest.raises(ValueError, match="placeholder"):
        check_sample(_sample(12, 1, seed=0), 16, IMAGE_ID, image_tokens=5)
    with pytest.raises(ValueError, match="pad_id"):
        pack_samples([_sample(4)], 16, IMAGE_ID, IMAGE_ID)
    with pytest.raises(ValueError, match="different lengths"):
        to_tensors(pack_samples([_sample(4)], 8, IMAGE_ID, PAD) + pack_samples([_sample(4)], 9, IMAGE_ID, PAD))


def test_encoder_labels_never_cross_documents(tokenizer):
    """Real encoded samples end with their own target (eos): concatenating them needs no relabelling."""
    enc = SampleEncoder(tokenizer, image_tokens=4, seq_len=64)
    records = [{"text": "a cat <image_placeholder> on a mat", "images": ["x.png"]},
               {"text": "plain words only"},
               {"conversation": [{"role": "User", "content": "hi <image_placeholder>"},
                                 {"role": "Assistant", "content": "hello"}], "images": ["y.png"]}]
    samples = [enc.encode(r) for r in records]
    for s in samples:
        assert s.labels[-1] == tokenizer.eos_id
    rows = pack_samples(samples, 64, tokenizer.image_id, tokenizer.pad_id, image_tokens=4)
    assert len(rows) == 1 and rows[0].images == ["x.png", "y.png"]
    segs = _segments(rows[0])
    for k, ((s, e), doc) in enumerate(zip(segs, samples)):
        assert rows[0].labels[s:e] == doc.labels
        assert rows[0].labels[e - 1] == tokenizer.eos_id
        if k + 1 < len(segs):  # a naive shift over the row would have made this bos the target instead
            assert rows[0].tokens[e] == tokenizer.bos_id


# ---------------------------------------------------------------------------------------------------------------
# model: document-causal attention


@pytest.fixture(scope="module")
def tiny(one_thread):
    cfg = config_from_dict(tiny_hybrid())
    model = build_model(cfg.model, "cpu", seed=0).eval()
    return cfg, model


def _docs(cfg, seed: int):
    """Samples with 0, 1 and 2 images of the model's image_tokens, plus their pixel tensors by path."""
    it = cfg.model.image_tokens
    g = torch.Generator().manual_seed(seed)
    samples = [_sample(11, 0, it, seed=seed * 10 + 0, tag=f"s{seed}a"),
               _sample(it + 9, 1, it, seed=seed * 10 + 1, tag=f"s{seed}b"),
               _sample(2 * it + 10, 2, it, seed=seed * 10 + 2, tag=f"s{seed}c"),
               _sample(7, 0, it, seed=seed * 10 + 3, tag=f"s{seed}d")]
    size = cfg.model.image_size
    pixels = {p: torch.rand(3, size, size, generator=g) for s in samples for p in s.images}
    return samples, pixels


def _image_tensor(paths_per_row: list[list[str]], pixels: dict, size: int) -> torch.Tensor | None:
    m = max(len(p) for p in paths_per_row)
    if m == 0:
        return None
    out = torch.zeros(len(paths_per_row), m, 3, size, size)
    for b, paths in enumerate(paths_per_row):
        for j, p in enumerate(paths):
            out[b, j] = pixels[p]
    return out


def _packed_batch(cfg, seq_len: int = 96):
    docs0, px0 = _docs(cfg, 1)
    docs1, px1 = _docs(cfg, 2)
    # lengths 42, 11, 25, 42, 25, 7, 7 (16 tokens per image) -> rows [c0 a0 b0 d1 d0 | 4 pad], [c1 b1 | 29 pad]
    docs = [docs0[2], docs0[0], docs0[1], docs1[2], docs1[1], docs1[3], docs0[3]]
    rows = pack_samples(docs, seq_len, cfg.model.image_token_id, PAD, image_tokens=cfg.model.image_tokens)
    assert [r.n_docs for r in rows] == [5, 2]
    pixels = {**px0, **px1}
    images = _image_tensor([r.images for r in rows], pixels, cfg.model.image_size)
    return docs, rows, pixels, images


def _alone(model, cfg, doc: EncodedSample, pixels) -> torch.Tensor:
    images = _image_tensor([doc.images], pixels, cfg.model.image_size)
    return model(torch.tensor([doc.tokens]), images)[0]


def test_packed_logits_equal_each_document_alone(tiny):
    cfg, model = tiny
    docs, rows, pixels, images = _packed_batch(cfg)
    tokens, _, positions, doc_ids = to_tensors(rows)
    with torch.no_grad():
        packed = model(tokens, images, positions, doc_ids)
        plain = model(tokens, images, positions)  # no document mask: later documents see earlier ones
        n_checked = 0
        for b, row in enumerate(rows):
            for s, e in _segments(row):
                doc = next(d for d in docs if d.tokens == row.tokens[s:e])
                alone = _alone(model, cfg, doc, pixels)
                torch.testing.assert_close(packed[b, s:e], alone, atol=1e-5, rtol=0)
                if s > 0:  # the mask is what makes this hold
                    assert (plain[b, s:e] - alone).abs().max() > 1e-3
                n_checked += 1
    assert n_checked == len(docs)


def test_packed_loss_and_grads_equal_token_weighted_document_losses(tiny):
    cfg, model = tiny
    docs, rows, pixels, images = _packed_batch(cfg)
    tokens, labels, positions, doc_ids = to_tensors(rows)
    n_labels = int((labels != IGNORE).sum())
    assert n_labels == sum(sum(1 for x in d.labels if x != IGNORE) for d in docs)
    params = [p for p in model.parameters()]

    def ce_sum(logits, lab):
        return F.cross_entropy(logits.float().flatten(0, -2), lab.flatten(), ignore_index=IGNORE, reduction="sum")

    packed_loss = ce_sum(model(tokens, images, positions, doc_ids), labels) / n_labels
    packed_grads = torch.autograd.grad(packed_loss, params, allow_unused=True)
    sep = sum(ce_sum(_alone(model, cfg, d, pixels), torch.tensor(d.labels)) for d in docs) / n_labels
    sep_grads = torch.autograd.grad(sep, params, allow_unused=True)
    torch.testing.assert_close(packed_loss, sep, atol=1e-5, rtol=1e-6)
    for a, b in zip(packed_grads, sep_grads):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _reference_causal_forward(model, tokens, images):
    """The pre-packing forward written out: rotary on arange positions, SDPA with is_causal=True."""
    h = model.embed(tokens, images)
    b, s = tokens.shape
    positions = torch.arange(s).expand(b, -1)
    for layer in model.layers.values():
        att = layer.attention
        x = layer.attention_norm(h)
        cos, sin = rotary_cos_sin(positions, att.head_dim, att.rope_theta)
        q = att.wq(x).view(b, s, -1, att.head_dim).transpose(1, 2)
        k = att.wk(x).view(b, s, -1, att.head_dim).transpose(1, 2)
        v = att.wv(x).view(b, s, -1, att.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = k.repeat_interleave(att.n_rep, dim=1), v.repeat_interleave(att.n_rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + att.wo(out.transpose(1, 2).reshape(b, s, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.head(h)


def test_doc_ids_none_is_the_unchanged_causal_path(tiny):
    cfg, model = tiny
    docs, pixels = _docs(cfg, 5)
    doc = docs[2]
    tokens = torch.tensor([doc.tokens, doc.tokens[::-1]])  # two rows with two images each
    images = _image_tensor([doc.images, doc.images[::-1]], pixels, cfg.model.image_size)
    with torch.no_grad():
        out = model(tokens, images)
        assert torch.equal(out, _reference_causal_forward(model, tokens, images))
        arange = torch.arange(tokens.shape[1]).expand(2, -1)
        assert torch.equal(out, model(tokens, images, arange))
        ones = model(tokens, images, None, torch.ones_like(tokens))
        torch.testing.assert_close(ones, out, atol=1e-6, rtol=0)


def test_document_causal_mask():
    doc_ids = torch.tensor([[1, 1, 2, 2, 2, 0, 0]])
    m = document_causal_mask(doc_ids)
    assert m.shape == (1, 1, 7, 7) and m.dtype == torch.bool
    for i in range(7):
        for j in range(7):
            assert bool(m[0, 0, i, j]) == (j <= i and doc_ids[0, i] == doc_ids[0, j])
    assert m.diagonal(dim1=-2, dim2=-1).all()  # no empty softmax row
    with pytest.raises(ValueError):
        document_causal_mask(doc_ids[0])
