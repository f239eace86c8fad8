"""The processor and tokenizer files of a DeepSeek-VL release directory: what their
``VLChatProcessor.from_pretrained(DIR)`` reads.

    deepseek_vl_processor_files(cfg, tokenizer)        preprocessor / processor / tokenizer files of an export
    deepseek_vl_processor_configs(cfg)                 (preprocessor_config.json, processor_config.json) dicts
    check_processor_files(dir, cfg, config)            a directory's processor files checked against the model
    import_deepseek_vl_tokenizer(path, out_file)       a DeepSeek-VL directory's tokenizer -> our tokenizer file

Beside config.json an export carries what their ``VLChatProcessor.from_pretrained(DIR)`` reads:
``preprocessor_config.json`` (their ``VLMImageProcessor``: the model's input size, padding with the first tower's
mean colour, normalising only where the vision config's towers do not), ``processor_config.json``
(``<image_placeholder>`` -> ``image_tokens`` ids, the "deepseek" chat format) and, given our tokenizer.json, the
tokenizer as a ``LlamaTokenizerFast`` directory (tokenizer.json with a BOS post-processor as DeepSeek-LLM's,
tokenizer_config.json, special_tokens_map.json). Import checks the processor files against the model and turns
the tokenizer back into ours (adding ``<image_placeholder>`` / ``<pad>`` when absent, as their processor adds the
image tag).

Their processor (``processing_vlm.py``) is a transformers ``ProcessorMixin`` of an ``AutoImageProcessor`` (their
``VLMImageProcessor``, registered under ``image_processor_type``) and a ``LlamaTokenizerFast``; its own settings
come from ``processor_config.json``. The image processor resizes the longer side to ``image_size``, pads with
``int(255 * image_mean)``, scales by ``rescale_factor`` and, when ``do_normalize``, normalises with
``image_mean`` / ``image_std``; the processor expands each ``image_tag`` into ``num_image_tokens`` ids.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlpretrain.checkpoint.deepseek_vl_config import deepseek_vl_config, read_config
from vlpretrain.config import ModelConfig
from vlpretrain.data.special_tokens import IMAGE_PLACEHOLDER
from vlpretrain.errors import UserError

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
IMAGE_TAG = IMAGE_PLACEHOLDER  # the processor's "image_tag"


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _tower_normalises(cfg: ModelConfig) -> bool:
    """Whether the exported vision config makes their towers normalise (``pixel_mean`` / ``pixel_std`` in the
    tower params): then the processor must not, or images would be normalised twice."""
    return _config_tower_normalises(deepseek_vl_config(cfg))


def deepseek_vl_processor_configs(cfg: ModelConfig) -> tuple[dict, dict]:
    """(preprocessor_config.json, processor_config.json) for ``cfg``, as in the released repos: the image processor
    at the model's input size (SAM's for the hybrid tower, SigLIP's alone), padding with the first tower's mean
    colour (what our data path does, ``data/preprocess.py``), normalising only where the towers do not."""
    mean, std = (cfg.sam.mean, cfg.sam.std) if cfg.sam.enabled else (cfg.siglip.mean, cfg.siglip.std)
    image = {"image_processor_type": "VLMImageProcessor", "processor_class": "VLChatProcessor",
             "image_size": cfg.image_size, "min_size": 14, "image_mean": list(mean), "image_std": list(std),
             "rescale_factor": 1.0 / 255.0, "do_normalize": not _tower_normalises(cfg),
             "background_color": [int(x * 255) for x in mean]}
    processor = {"processor_class": "VLChatProcessor", "image_tag": IMAGE_TAG,
                 "num_image_tokens": cfg.image_tokens, "add_special_token": False, "sft_format": "deepseek",
                 "mask_prompt": True, "ignore_id": -100}
    return image, processor


def _tokenizer_files(cfg: ModelConfig, path: str | Path) -> dict[str, bytes]:
    """tokenizer.json (ours, plus the post-processor that puts BOS first, as DeepSeek-LLM's file has: their
    processor encodes with ``tokenizer.encode``), tokenizer_config.json and special_tokens_map.json."""
    from tokenizers import processors

    from vlpretrain.data.tokenizer import BOS, EOS, IMAGE, PAD, TextTokenizer

    tok = TextTokenizer(path)  # UserError for a missing special token or a damaged file
    if tok.image_id != cfg.image_token_id:
        raise UserError(f"tokenizer {path}: {IMAGE} has id {tok.image_id}, model.image_token_id is "
                        f"{cfg.image_token_id}")
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer {path}: {tok.vocab_size} tokens, more than model.vocab_size={cfg.vocab_size}")
    t = tok.tok
    t.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                     special_tokens=[(BOS, tok.bos_id)])
    tok_config = {"tokenizer_class": "LlamaTokenizerFast", "processor_class": "VLChatProcessor",
                  "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
                  "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "legacy": True, "model_max_length": cfg.max_seq_len}
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": [IMAGE]}

    def js(d: dict) -> bytes:
        return (json.dumps(d, indent=2, ensure_ascii=False) + "\n").encode()

    return {TOKENIZER_FILE: _legacy_merges(t.to_str()), TOKENIZER_CONFIG: js(tok_config),
            SPECIAL_TOKENS_MAP: js(special)}


def _legacy_merges(tokenizer_json: str) -> bytes:
    """BPE merges as "a b" strings (the form of DeepSeek-LLM's file), not the [a, b] pairs tokenizers >= 0.20
    writes: the tokenizers their transformers 4.x needs (< 0.19) cannot read the pairs. Kept as pairs only if a
    token holds a space (which "a b" cannot express; byte-level BPE never has one)."""
    d = json.loads(tokenizer_json)
    merges = (d.get("model") or {}).get("merges")
    if merges and isinstance(merges[0], list) and not any(" " in x for m in merges for x in m):
        d["model"]["merges"] = [" ".join(m) for m in merges]
    return (json.dumps(d, indent=2, ensure_ascii=False) + "\n").encode()


def deepseek_vl_processor_files(cfg: ModelConfig, tokenizer: str | Path | None = None) -> dict[str, bytes]:
    """The files beside config.json that their ``VLChatProcessor.from_pretrained`` reads (name -> bytes):
    preprocessor_config.json, processor_config.json and, with ``tokenizer`` (our tokenizer.json), the tokenizer
    files. A tokenizer that does not fit the model raises UserError (one line)."""
    image, processor = deepseek_vl_processor_configs(cfg)
    out = {PREPROCESSOR_CONFIG: (json.dumps(image, indent=2) + "\n").encode(),
           PROCESSOR_CONFIG: (json.dumps(processor, indent=2) + "\n").encode()}
    if tokenizer is not None:
        out.update(_tokenizer_files(cfg, tokenizer))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _token_content(v: Any) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def import_deepseek_vl_tokenizer(path: str | Path, out_file: str | Path) -> dict:
    """The tokenizer of a DeepSeek-VL directory (tokenizer.json; BOS / EOS named in tokenizer_config.json or
    special_tokens_map.json) -> our tokenizer file ``out_file``, written atomically. Like their processor, a
    tokenizer without ``<image_placeholder>`` gets it added as a special token; ``<pad>`` (which our data path
    needs) likewise. Returns {"tokenizer", "image_token_id", "added"}. UserError (one line) when the directory has
    no tokenizer.json or its BOS / EOS are not DeepSeek-LLM's."""
    from tokenizers import AddedToken, Tokenizer

    from vlpretrain.data.tokenizer import BOS, EOS, IMAGE, PAD, TextTokenizer

    d = Path(path)
    f = d / TOKENIZER_FILE
    if not f.is_file():
        raise UserError(f"{d}: no {TOKENIZER_FILE} (a DeepSeek-VL directory carries its tokenizer)")
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises a bare Exception with serde's message
        raise UserError(f"{f}: not a tokenizers JSON file ({(str(e).splitlines() or ['?'])[0]})") from None
    named: dict[str, Any] = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):  # tokenizer_config.json wins
        if (d / name).is_file():
            named.update({k: v for k, v in json.loads((d / name).read_text()).items() if v is not None})
    for key, want in (("bos_token", BOS), ("eos_token", EOS)):
        got = _token_content(named.get(key, want))
        if got != want or tok.token_to_id(want) is None:
            raise UserError(f"{d}: {key} is {got!r} (id {tok.token_to_id(str(got))}), expected DeepSeek-LLM's "
                            f"{want!r} in {TOKENIZER_FILE}")
    added = [t for t in (IMAGE, PAD) if tok.token_to_id(t) is None]
    if added:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, out)
    ours = TextTokenizer(out)
    return {"tokenizer": str(out), "image_token_id": ours.image_id, "added": added}


def _config_tower_normalises(config: dict) -> bool:
    params = (config.get("vision_config") or {}).get("params") or {}
    tower = params.get("low_res_cfg", params)
    return tower.get("pixel_mean") is not None and tower.get("pixel_std") is not None


def check_processor_files(path: str | Path, cfg: ModelConfig, config: dict | None = None) -> dict:
    """Read a directory's preprocessor_config.json / processor_config.json (absent: {}) and check them against
    ``cfg``: input size, image tokens per ``<image_placeholder>``, image tag, and that images are not normalised
    twice (by the processor and by the towers of ``config``, the directory's config.json). Returns the image
    processor settings; ValueError naming the file and field on a mismatch."""
    d = Path(path)
    config = read_config(d) if config is None else config
    image = json.loads((d / PREPROCESSOR_CONFIG).read_text()) if (d / PREPROCESSOR_CONFIG).is_file() else {}
    proc = json.loads((d / PROCESSOR_CONFIG).read_text()) if (d / PROCESSOR_CONFIG).is_file() else {}
    checks = [(PREPROCESSOR_CONFIG, "image_size", image.get("image_size", cfg.image_size), cfg.image_size),
              (PROCESSOR_CONFIG, "num_image_tokens", proc.get("num_image_tokens", cfg.image_tokens),
               cfg.image_tokens),
              (PROCESSOR_CONFIG, "image_tag", proc.get("image_tag", IMAGE_TAG), IMAGE_TAG)]
    for file, field, got, want in checks:
        if got != want:
            raise ValueError(f"{d / file}: {field} = {got!r}, the model needs {want!r}")
    if image.get("do_normalize", False) and _config_tower_normalises(config):
        raise ValueError(f"{d / PREPROCESSOR_CONFIG}: do_normalize is true and the vision config's towers normalise "
                         f"too (pixel_mean / pixel_std): images would be normalised twice")
    return image


def read_image_processor(d: Path) -> dict | None:
    """The preprocessor_config.json of directory ``d``; None when it has none."""
    f = d / PREPROCESSOR_CONFIG
    return json.loads(f.read_text()) if f.is_file() else None
