"""Document-causal attention kernels (``model.attention``) against the dense-mask reference.

- ``varlen`` (per-document causal attention) and ``flex`` (FlexAttention with a block mask from the document
  ids) give the dense mask's outputs; ``varlen`` also its gradients (torch has no FlexAttention backward on
  CPU: flex's backward is checked on GPU by bench/gpu_check.py);
- flex's block mask is exact: a block is skipped iff the dense mask has no True in it, and marked full (no
  mask function) only where the dense mask is all True;
- a whole model's packed rows give the same logits and gradients under every kernel (the equivalence worker
  repeats this through pipeline stages with TP/SP: tests/test_parallel_equivalence.py);
- memory probe at S = 4096: no tensor with S x S entries exists on the varlen path (every op's output is
  recorded), and the compiled flex forward's peak RSS stays far below the dense path's.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vlpretrain.config import config_from_dict
from vlpretrain.models.attention import (
    CPU_DENSE_MAX_LEN,
    FLEX_BLOCK,
    dense_document_causal_mask,
    document_mask,
    document_runs,
    resolve_kind,
)
from vlpretrain.models.vlm import build_model

ROOT = Path(__file__).resolve().parents[1]


def _doc_ids(lengths_per_row: list[list[int]], s: int) -> torch.Tensor:
    """Rows of documents with these lengths, ids 1, 2, ... and padding (id 0) to ``s``."""
    rows = []
    for lengths in lengths_per_row:
        ids = [i + 1 for i, n in enumerate(lengths) for _ in range(n)]
        rows.append(ids + [0] * (s - len(ids)))
    return torch.tensor(rows)


LAYOUTS = {
    "two_rows_with_padding": ([[5, 17, 40, 3], [64]], 80),
    "one_document": ([[300]], 300),
    "ragged_last_block": ([[130, 1, 126, 40], [256, 44]], 300),
    "block_aligned": ([[128, 256, 128], [100, 156, 256]], 512),
    "tiny_documents": ([[1] * 50 + [7] * 10], 140),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_varlen_equals_dense_mask_outputs_and_gradients(name):
    lengths, s = LAYOUTS[name]
    doc_ids = _doc_ids(lengths, s)
    torch.manual_seed(0)
    q, k, v = (torch.randn(doc_ids.shape[0], 3, s, 16, requires_grad=True) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_document_causal_mask(doc_ids))
    out = document_mask(doc_ids, "varlen").attend(q, k, v)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    g_out = torch.autograd.grad((out * w).sum(), (q, k, v))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_flex_block_mask_is_exact_and_forward_equals_dense(name):
    lengths, s = LAYOUTS[name]
    doc_ids = _doc_ids(lengths, s)
    dense = dense_document_causal_mask(doc_ids)[:, 0]  # (B, S, S)
    mask = document_mask(doc_ids, "flex")
    nb = -(-s // FLEX_BLOCK)
    padded = F.pad(dense, (0, nb * FLEX_BLOCK - s, 0, nb * FLEX_BLOCK - s))
    tiles = padded.view(-1, nb, FLEX_BLOCK, nb, FLEX_BLOCK)
    any_true, all_true = tiles.any(4).any(2), tiles.all(4).all(2)
    bm = mask.block_mask
    computed = bm.to_dense()[:, 0].bool()  # blocks the kernel visits (partial or full)
    assert torch.equal(computed, any_true), "a block is skipped that the dense mask needs, or visited in vain"
    full = torch.zeros_like(computed)
    for b in range(full.shape[0]):
        for i in range(nb):
            n = int(bm.full_kv_num_blocks[b, 0, i])
            full[b, i, bm.full_kv_indices[b, 0, i, :n].long()] = True
    assert not (full & ~all_true).any(), "a block marked full holds masked pairs"
    if name == "one_document":  # the blocks strictly below the diagonal skip the mask function
        assert int(full.sum()) == nb * (nb - 1) // 2 - (nb - 1)  # (the ragged last row of blocks stays partial)
    torch.manual_seed(1)
    q, k, v = (torch.randn(doc_ids.shape[0], 2, s, 16) for _ in range(3))
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
        torch.testing.assert_close(mask.attend(q, k, v), ref, atol=2e-6, rtol=1e-5)


def test_flex_refuses_cpu_training_with_one_line():
    doc_ids = _doc_ids([[3, 5]], 8)
    q = torch.randn(1, 1, 8, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="cannot train on CPU"):
        document_mask(doc_ids, "flex").attend(q, q, q)


def test_auto_kind_and_runs():
    assert resolve_kind("auto", torch.device("cpu")) == "varlen"
    assert resolve_kind("auto", torch.device("cpu"), CPU_DENSE_MAX_LEN) == "sdpa_mask"  # short rows: the mask
    assert resolve_kind("auto", torch.device("cpu"), CPU_DENSE_MAX_LEN + 1) == "varlen"  # is cheaper there
    assert resolve_kind("varlen", torch.device("cpu"), 16) == "varlen"
    assert document_mask(torch.ones(2, 64, dtype=torch.long)).kind == "sdpa_mask"
    assert document_mask(torch.ones(1, CPU_DENSE_MAX_LEN + 1, dtype=torch.long)).kind == "varlen"
    assert resolve_kind("sdpa_mask", torch.device("cpu")) == "sdpa_mask"
    assert resolve_kind("auto", torch.device("cuda")) == "flex"
    assert document_runs(torch.tensor([[1, 1, 2, 0, 0], [4, 4, 4, 4, 4]])).tolist() == [[0, 0, 1, 2, 2],
                                                                                         [0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="unknown attention kind"):
        document_mask(torch.ones(1, 4, dtype=torch.long), "dense")


def _tiny(attention: str):
    return config_from_dict({
        "model": {"vocab_size": 96, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 48,
                  "max_seq_len": 96, "image_token_id": 90, "attention": attention,
                  "siglip": {"image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "heads": 2},
                  "sam": {"enabled": False}},
        "train": {"seq_len": 96, "global_batch_size": 2, "micro_batch_size": 2}})


def test_model_packed_rows_equal_under_every_kernel():
    doc_ids = _doc_ids([[20, 30, 11], [60, 3]], 80)
    positions = torch.cat([torch.arange(n) for n in (20, 30, 11, 19)]), torch.cat(
        [torch.arange(n) for n in (60, 3, 17)])
    positions = torch.stack(positions)
    tokens = torch.randint(0, 89, doc_ids.shape, generator=torch.Generator().manual_seed(0))
    results = {}
    for kind in ("sdpa_mask", "varlen", "flex"):
        model = build_model(_tiny(kind).model, seed=3)
        if kind == "flex":
            with torch.no_grad():
                results[kind] = (model(tokens, None, positions, doc_ids), None)
            continue
        logits = model(tokens, None, positions, doc_ids)
        loss = logits.float().logsumexp(-1).mean()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        results[kind] = (logits.detach(), grads)
    ref_logits, ref_grads = results["sdpa_mask"]
    for kind in ("varlen", "flex"):
        torch.testing.assert_close(results[kind][0], ref_logits, atol=1e-5, rtol=1e-5, msg=kind)
    for a, b in zip(results["varlen"][1], ref_grads):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward run through dispatch)."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), str(func))
        return out


S_PROBE = 4096


def _probe_inputs(requires_grad: bool):
    doc_ids = _doc_ids([[1000, 500, 1500, 1000]], S_PROBE)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, S_PROBE, 16, requires_grad=requires_grad) for _ in range(3))
    return doc_ids, q, k, v


@pytest.mark.parametrize("kind", ["varlen", "sdpa_mask"])
def test_memory_probe_no_s_by_s_tensor_on_varlen(kind):
    doc_ids, q, k, v = _probe_inputs(True)
    with _LargestOutput() as probe:
        out = document_mask(doc_ids, kind).attend(q, k, v)
        out.sum().backward()
    n, op = probe.largest
    if kind == "varlen":
        assert n < S_PROBE * S_PROBE // 16, f"varlen allocated {n} entries ({op})"
    else:  # the probe sees the dense mask: it would catch one on the varlen path
        assert n >= S_PROBE * S_PROBE, (n, op)


_RSS_PROBE = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from test_attention import _probe_inputs
    from vlpretrain.models.attention import document_mask

    def rss_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    def peak_above_now(kind):
        doc_ids, q, k, v = _probe_inputs(False)
        with torch.no_grad():
            document_mask(doc_ids, kind).attend(q, k, v)  # warm-up: compilation, allocator pools
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak (VmHWM) to the current RSS
            base = rss_kib("VmRSS:")
            out = document_mask(doc_ids, kind).attend(q, k, v)
            return (rss_kib("VmHWM:") - base) * 1024, out
    flex, a = peak_above_now("flex")
    dense, b = peak_above_now("sdpa_mask")
    print(flex, dense, float((a - b).abs().max()))
""")


def test_memory_probe_compiled_flex_forward_peak_rss(tmp_path):
    """Compiled flex at S = 4096: the forward's peak RSS above its start is far below one S x S bool mask
    (16 MiB), while the dense-mask forward's is above it (the probe's positive control)."""
    script = tmp_path / "probe.py"
    script.write_text(_RSS_PROBE.format(root=str(ROOT), tests=str(ROOT / "tests")))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    flex, dense, diff = proc.stdout.split()[-3:]
    s2 = S_PROBE * S_PROBE
    assert int(dense) >= s2, f"dense forward peak {int(dense) / 2**20:.1f} MiB: the probe cannot see a mask"
    assert int(flex) < s2 // 4, f"flex forward peak {int(flex) / 2**20:.1f} MiB above start"
    assert float(diff) < 1e-5
    print(f"peak RSS above start, S = {S_PROBE}: flex {int(flex) / 2**20:.2f} MiB, dense {int(dense) / 2**20:.2f} MiB")
