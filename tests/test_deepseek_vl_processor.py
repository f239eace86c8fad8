"""The processor and tokenizer files of a DeepSeek-VL export (vlpretrain/checkpoint/deepseek_vl_processor.py):
what DeepSeek-VL's VLChatProcessor.from_pretrained reads, checked on import; tokenizers imported back.

Tiny models only, no network: HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from export_helpers import (
    _assert_same_state,
    _export,
    _model,
    _randomise,
    tiny_hybrid,
    tiny_siglip_only,
)

from vlpretrain.checkpoint.deepseek_vl import import_deepseek_vl, load_deepseek_vl
from vlpretrain.checkpoint.deepseek_vl_config import model_config_from_dict
from vlpretrain.checkpoint.deepseek_vl_processor import import_deepseek_vl_tokenizer
from vlpretrain.data.preprocess import background_color, load_image, preprocess_image
from vlpretrain.data.tokenizer import BOS, EOS, PAD, TextTokenizer
from vlpretrain.errors import UserError

transformers = pytest.importorskip("transformers")

# Processor and tokenizer files (what DeepSeek-VL's VLChatProcessor.from_pretrained reads)
#
# The official deepseek_vl package is not vendored and needs transformers 4.x (it fails to import on 5.x, which the
# test env has), so the files are checked here against what its code reads: VLMImageProcessor's and
# VLChatProcessor's __init__ arguments (deepseek_vl/models/{image_processing,processing}_vlm.py), a tokenizer that
# transformers loads with BOS first, as their ``tokenizer.encode`` expects. test_official_processor_opens_export runs
# the official processor itself when VLP_DEEPSEEK_VL_PYTHONPATH points at a transformers 4.x + deepseek_vl tree.

# __init__ parameters of their VLMImageProcessor / VLChatProcessor (+ what transformers' mixins pop or keep)
OFFICIAL_IMAGE_PROCESSOR_ARGS = {"image_size", "min_size", "image_mean", "image_std", "rescale_factor",
                                 "do_normalize", "image_processor_type", "processor_class", "background_color"}
OFFICIAL_PROCESSOR_ARGS = {"image_tag", "num_image_tokens", "add_special_token", "sft_format", "mask_prompt",
                           "ignore_id", "processor_class"}
EXPORT_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
PROMPT = "User: <image_placeholder>What colour is the circle?\n\nAssistant: It is red, héllo  world."

pytestmark = pytest.mark.usefixtures("one_thread")



def _with_demo_vocab(make):
    return make(vocab_size=2048)  # the demo tokenizer's size; its <image_placeholder> is id 2 = IMAGE_ID


@pytest.mark.parametrize("make", [tiny_hybrid, tiny_siglip_only], ids=["hybrid", "siglip_only"])
def test_deepseek_vl_export_has_processor_and_tokenizer(tmp_path, demo_dir, make):
    model = _randomise(_model(_with_demo_vocab(make)), seed=30)
    cfg = model.cfg
    tok_file = demo_dir / "tokenizer.json"
    out = _export(model, cfg, tmp_path / "ds", tokenizer=tok_file)
    assert {p.name for p in out.iterdir()} == EXPORT_FILES

    image = json.loads((out / "preprocessor_config.json").read_text())
    assert set(image) <= OFFICIAL_IMAGE_PROCESSOR_ARGS and image["image_processor_type"] == "VLMImageProcessor"
    assert image["image_size"] == cfg.image_size  # SAM's input for the hybrid tower, SigLIP's alone
    mean = cfg.sam.mean if cfg.sam.enabled else cfg.siglip.mean
    assert image["image_mean"] == list(mean) and tuple(image["background_color"]) == background_color(mean)
    # images are normalised once: by their towers in the hybrid (pixel_mean / pixel_std in the vision config), by
    # the processor for SigLIP alone (as the released 1.3B)
    params = json.loads((out / "config.json").read_text())["vision_config"]["params"]
    if cfg.sam.enabled:
        assert "pixel_mean" in params["low_res_cfg"] and image["do_normalize"] is False
    else:
        assert "pixel_mean" not in params and "pixel_std" not in params and image["do_normalize"] is True
        assert image["image_std"] == list(cfg.siglip.std)
    proc = json.loads((out / "processor_config.json").read_text())
    assert set(proc) <= OFFICIAL_PROCESSOR_ARGS
    assert proc["image_tag"] == "<image_placeholder>" and proc["num_image_tokens"] == cfg.image_tokens

    # the tokenizer: transformers loads it with DeepSeek-LLM's specials and BOS first, ids as ours
    ours = TextTokenizer(tok_file)
    for cls in (transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast):
        hf = cls.from_pretrained(str(out))
        assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS, EOS, PAD)
        assert hf.convert_tokens_to_ids("<image_placeholder>") == cfg.image_token_id
        assert hf.encode(PROMPT) == [ours.bos_id] + ours.encode(PROMPT)
        assert hf.decode(ours.encode(PROMPT)) == PROMPT
    # merges as "a b" strings, as DeepSeek-LLM's file: the tokenizers < 0.19 of their transformers 4.x cannot
    # read the [a, b] pairs that tokenizers >= 0.20 writes
    merges = json.loads((out / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "LlamaTokenizerFast" and tok_cfg["add_bos_token"] is True

    # import reads it back: our tokenizer file, same ids, image token id from the tokenizer
    model_dict, state = import_deepseek_vl(out, tokenizer_out=tmp_path / "imported" / "tokenizer.json")
    back = TextTokenizer(tmp_path / "imported" / "tokenizer.json")
    assert back.encode(PROMPT) == ours.encode(PROMPT) and back.vocab_size == ours.vocab_size
    assert (back.bos_id, back.eos_id, back.image_id, back.pad_id) == (ours.bos_id, ours.eos_id, ours.image_id,
                                                                      ours.pad_id)
    assert model_dict["image_token_id"] == ours.image_id
    assert model_config_from_dict(model_dict) == cfg
    _assert_same_state(state, model.state_dict())


def test_export_refuses_a_tokenizer_that_does_not_fit(tmp_path, demo_dir):
    model = _model(_with_demo_vocab(tiny_hybrid)).eval()
    bad_id = _model({**_with_demo_vocab(tiny_hybrid), "image_token_id": 7})
    with pytest.raises(UserError, match="image_token_id"):
        _export(bad_id, bad_id.cfg, tmp_path / "a", tokenizer=demo_dir / "tokenizer.json")
    small = _model(tiny_hybrid())  # vocab 256 < the tokenizer's 2048
    with pytest.raises(UserError, match="vocab_size"):
        _export(small, small.cfg, tmp_path / "b", tokenizer=demo_dir / "tokenizer.json")
    with pytest.raises(FileNotFoundError):
        _export(model, model.cfg, tmp_path / "c", tokenizer=tmp_path / "missing.json")
    assert not any(tmp_path.iterdir())  # refused before anything was written


def _released_style_tokenizer(d: Path, bos=BOS) -> None:
    """A tokenizer dir as DeepSeek-LLM ships it: BOS / EOS as AddedToken dicts in tokenizer_config.json, no
    <image_placeholder> and no <pad>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {BOS: 0, EOS: 1, **{c: i + 2 for i, c in enumerate("abcdefghij ")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.add_special_tokens([BOS, EOS])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"__type": "AddedToken", "content": bos, "special": True},
        "eos_token": {"__type": "AddedToken", "content": EOS, "special": True}, "pad_token": None}))


def test_import_released_style_tokenizer_adds_image_tag_and_pad(tmp_path):
    _released_style_tokenizer(tmp_path / "src")
    report = import_deepseek_vl_tokenizer(tmp_path / "src", tmp_path / "out" / "tokenizer.json")
    assert report["added"] == ["<image_placeholder>", "<pad>"]
    tok = TextTokenizer(tmp_path / "out" / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.image_id, tok.pad_id) == (0, 1, 13, 14) == (0, 1, report["image_token_id"], 14)
    assert tok.encode("a<image_placeholder>b") == [2, 13, 3]
    _released_style_tokenizer(tmp_path / "other", bos="<s>")
    with pytest.raises(UserError, match="bos_token"):
        import_deepseek_vl_tokenizer(tmp_path / "other", tmp_path / "out2" / "tokenizer.json")


@pytest.mark.parametrize("file, field, value, match", [
    ("processor_config.json", "num_image_tokens", 576, "num_image_tokens"),
    ("preprocessor_config.json", "image_size", 1024, "image_size"),
    ("preprocessor_config.json", "do_normalize", True, "normalised twice"),
])
def test_processor_files_checked_on_import(tmp_path, file, field, value, match):
    model = _randomise(_model(tiny_hybrid()), seed=31)
    out = _export(model, model.cfg, tmp_path / "ds")
    d = json.loads((out / file).read_text())
    d[field] = value
    (out / file).write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        import_deepseek_vl(out)
    with pytest.raises(ValueError, match=match):
        load_deepseek_vl(_model(tiny_hybrid()), out)


OFFICIAL_SCRIPT = r"""
import json, sys
import numpy as np
from PIL import Image
from deepseek_vl.models import VLChatProcessor
proc = VLChatProcessor.from_pretrained(sys.argv[1])
conv = [{"role": "User", "content": "<image_placeholder>What colour is the circle?", "images": [sys.argv[2]]},
        {"role": "Assistant", "content": ""}]
out = proc(conversations=conv, images=[Image.open(sys.argv[2]).convert("RGB")], force_batchify=True)
print(json.dumps({"sft_format": out.sft_format[0], "input_ids": out.input_ids[0].tolist(),
                  "pixel_values": out.pixel_values[0, 0].tolist(), "image_id": proc.image_id,
                  "images_seq_mask": int(out.images_seq_mask.sum()), "tokenizer": type(proc.tokenizer).__name__}))
"""


@pytest.mark.skipif(not os.environ.get("VLP_DEEPSEEK_VL_PYTHONPATH"),
                    reason="needs the official deepseek_vl code + transformers 4.x (VLP_DEEPSEEK_VL_PYTHONPATH)")
@pytest.mark.parametrize("make", [tiny_hybrid, tiny_siglip_only], ids=["hybrid", "siglip_only"])
def test_official_processor_opens_export(tmp_path, demo_dir, make):
    """Their VLChatProcessor.from_pretrained(export) in a subprocess (its own transformers 4.x): the token ids
    and pixel values it gives equal our data path's (tokenizer + data/preprocess.py)."""
    import subprocess

    import numpy as np
    from PIL import Image

    model = _model(_with_demo_vocab(make))
    cfg = model.cfg
    out = _export(model, cfg, tmp_path / "ds", tokenizer=demo_dir / "tokenizer.json")
    rng = np.random.default_rng(0)
    img = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).save(img)
    env = {**os.environ, "PYTHONPATH": os.environ["VLP_DEEPSEEK_VL_PYTHONPATH"]}
    res = subprocess.run([sys.executable, "-c", OFFICIAL_SCRIPT, str(out), str(img)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    tok = TextTokenizer(demo_dir / "tokenizer.json")
    assert got["sft_format"].startswith("You are a helpful language and vision assistant.")  # their default
    assert got["sft_format"].endswith("\n\nUser: <image_placeholder>What colour is the circle?\n\nAssistant:")
    ids = [tok.bos_id]
    for t in tok.encode(got["sft_format"]):
        ids += [t] * (cfg.image_tokens if t == tok.image_id else 1)
    assert got["input_ids"] == ids and got["image_id"] == cfg.image_token_id
    assert got["images_seq_mask"] == cfg.image_tokens
    mean = cfg.sam.mean if cfg.sam.enabled else cfg.siglip.mean
    ours = preprocess_image(load_image(img), cfg.image_size, mean).float()
    theirs = torch.tensor(got["pixel_values"])
    tol = 2 / 255 + 1e-6
    if not cfg.sam.enabled:  # their processor normalises for SigLIP alone (the released 1.3B), our tower does
        ours = (ours - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(cfg.siglip.std).view(3, 1, 1)
        tol /= min(cfg.siglip.std)
    assert theirs.shape == ours.shape and (theirs - ours).abs().max().item() <= tol
