"""Weights streamed into and out of any layout (issue 11 items 2-3).

In: ``train.pretrained.{llm, siglip, sam}`` load under torchrun in (dp, tp, pp) = (1, 2, 2), (2, 1, 2), (2, 2, 1)
and HSDP (dp 4 as 2 replicas x 2 shards), each rank reading only its stages' tensors and its TP / FSDP slices;
the first step's loss (a function of the logits) equals the single-process load's. Out: the final
``model.safetensors`` is written by every rank, each its own shards, into one shared file: the frozen pretrained
tensors come back bit for bit, and the file equals the single-process run's. The streaming writer's bytes equal
``safetensors.save_file``'s.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY
from safetensors.torch import load_file, save_file

from vlpretrain.checkpoint.safetensors_stream import save_streaming
from vlpretrain.models.state_dict_adapter import SAM_PREFIX, SAM_VIT_PREFIX, SIGLIP_PREFIX, hf_llama_key_map


def test_streamed_file_equals_save_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(3, generator=g).bfloat16(), "a": torch.randn(2, 2, generator=g),
               "c": torch.arange(5), "aa": torch.ones(1, dtype=torch.float16), "z": torch.randn(7, 3, generator=g),
               "empty": torch.zeros(0, 4), "flag": torch.tensor([True, False])}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"step": "3"})
    specs = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    save_streaming(tmp_path / "ours.safetensors", reversed(list(tensors.items())), specs, {"step": "3"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_streamed_file_missing_a_tensor_is_not_published(tmp_path):
    specs = {"a": ((2,), torch.float32), "b": ((3,), torch.float32)}
    with pytest.raises(ValueError, match="1 tensors were never written"):
        save_streaming(tmp_path / "w.safetensors", [("a", torch.zeros(2))], specs)
    assert not list(tmp_path.iterdir())  # neither the file nor its .tmp


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A HF LLaMA dir (2 shards), a timm-named SigLIP file and a SAM file (neck_hd tail included), all from a
    model whose weights differ from the run's own init (another seed), so a missed load cannot pass."""
    from vlpretrain.config import load_config
    from vlpretrain.models.vlm import build_model

    cfg = load_config(TINY / "stage1.yaml").model
    state = build_model(cfg, "cpu", seed=11).state_dict()
    root = tmp_path_factory.mktemp("pretrained")
    llm = root / "llm"
    llm.mkdir()
    to_hf = {ours: hf for hf, ours in hf_llama_key_map(cfg.n_layers).items()}
    hf = {to_hf[k]: v for k, v in state.items() if k in to_hf}
    names = sorted(hf)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: hf[k].to(torch.bfloat16) for k in keys}, str(llm / file))  # bf16 on disk: cast on load
    (llm / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in halves.items() for k in keys}}))
    (llm / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "intermediate_size": cfg.ffn_dim,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": False}))
    siglip = {k[len(SIGLIP_PREFIX):]: v for k, v in state.items() if k.startswith(SIGLIP_PREFIX)}
    save_file(siglip, str(root / "siglip.safetensors"))
    sam = {(k[len(SAM_VIT_PREFIX):] if k.startswith(SAM_VIT_PREFIX) else k[len(SAM_PREFIX):]): v
           for k, v in state.items() if k.startswith(SAM_PREFIX)}
    save_file(sam, str(root / "sam.safetensors"))
    expected = {k: (v.to(torch.bfloat16).float() if k in to_hf else v) for k, v in state.items()
                if k in to_hf or k.startswith((SIGLIP_PREFIX, SAM_PREFIX))}
    return root, expected


def _train(demo_dir: Path, run_dir: Path, pre: Path, nproc: int, *layout: str) -> dict:
    cmd = [sys.executable, "-m", "vlpretrain"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "vlpretrain"]
    sets = [f"data.root={demo_dir}", f"train.run_dir={run_dir}", "train.init_from=", "train.eval_file=",
            "train.eval_text=", "train.steps=1", "train.global_batch_size=4", "train.micro_batch_size=1",
            "train.seq_len=96", "train.warmup_steps=0",
            "train.lr=1.0e-3", "train.eps=1.0e-6",  # Adam's first step is ~lr*sign(g): eps keeps tiny g tiny
            f"train.pretrained.llm={pre / 'llm'}",
            f"train.pretrained.siglip={pre / 'siglip.safetensors'}", f"train.pretrained.sam={pre / 'sam.safetensors'}",
            *layout]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd + ["train", "--config", str(TINY / "stage1.yaml"), "--set", *sets],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"loss": rows[0]["loss"], "weights": load_file(str(run_dir / "checkpoints" / "step_00000001"
                                                               / "model.safetensors"))}


def test_pretrained_parts_load_into_layouts_and_stream_back_out(demo_dir, pretrained, tmp_path):
    pre, expected = pretrained
    ref = _train(demo_dir, tmp_path / "single", pre, 1)
    for k, v in expected.items():  # stage 1 trains only the adaptor: the loaded parts come back exactly
        assert torch.equal(ref["weights"][k], v), k
    for layout in (["parallel.tp=2", "parallel.pp=2"], ["parallel.dp=2", "parallel.pp=2"],
                   ["parallel.dp=2", "parallel.tp=2"],  # FSDP over TP: both shard dim 0 of colwise weights
                   ["parallel.dp=4", "parallel.dp_shard=2"]):  # HSDP: one writer per replicated shard
        got = _train(demo_dir, tmp_path / "_".join(layout), pre, 4, *layout)
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), layout
        assert got["weights"].keys() == ref["weights"].keys(), layout
        for k, v in expected.items():
            assert torch.equal(got["weights"][k], v), (layout, k)
        for k, v in ref["weights"].items():  # the trained adaptor too (one Adam step: as test_parallel_train)
            torch.testing.assert_close(got["weights"][k], v, atol=1e-4, rtol=0,
                                       msg=lambda m, k=k, layout=layout: f"{layout} {k}")


def test_export_streams_from_a_dcp_checkpoint_and_from_full_weights(demo_dir, tmp_path):
    """``ckpt export`` reads tensor by tensor, no model built: from an intermediate (DCP-only) checkpoint and
    from the final model.safetensors, the HF files hold exactly the checkpoint's LLM tensors."""
    from vlpretrain.checkpoint.weights import read_weights

    run = tmp_path / "run"
    sets = [f"data.root={demo_dir}", f"train.run_dir={run}", "train.init_from=", "train.eval_file=",
            "train.eval_text=", "train.steps=2", "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.seq_len=128", "checkpoint.interval=1", "checkpoint.keep_last=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "vlpretrain"]
    proc = subprocess.run(base + ["train", "--config", str(TINY / "stage2.yaml"), "--set", *sets],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = run / "checkpoints"
    assert not (ckpts / "step_00000001" / "model.safetensors").exists()  # DCP shards only
    assert (ckpts / "step_00000002" / "model.safetensors").exists()
    from vlpretrain.config import load_config
    n_layers = load_config(TINY / "stage2.yaml").model.n_layers
    for step in ("step_00000001", "step_00000002"):
        out = tmp_path / f"hf_{step}"
        proc = subprocess.run(base + ["ckpt", "export", "--config", str(TINY / "stage2.yaml"), str(ckpts / step),
                                      "--format", "hf", "--out", str(out), "--set", *sets],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ours = read_weights(ckpts / step)
        got = load_file(str(out / "model.safetensors"))
        key_map = hf_llama_key_map(n_layers)
        assert set(got) == set(key_map)
        for hf, k in key_map.items():
            assert torch.equal(got[hf], ours[k]), (step, hf)
