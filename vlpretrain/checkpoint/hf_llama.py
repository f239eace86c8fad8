"""The HF LLaMA format (``LlamaForCausalLM`` directories, DeepSeek-LLM's too): writing.

    hf_llama_config(cfg, dtype)                        our decoder's LlamaConfig dict (config.json)
    export_hf_llama(model_or_state, cfg, out_dir)      the language model as a HF ``LlamaForCausalLM`` directory
    LLAMA_DEFAULTS                                     transformers' LlamaConfig defaults, for sparse configs

Reading the format (``load_hf_llm``, ``check_hf_llm_config``, ``rope_settings``) stays with the pretrained-part
loaders in ``pretrained.py``: ``load_pretrained_parts`` calls it there, and the writer here builds on that module
(``hf_dir.py`` reads with its ``TensorSource``), so a loader here would close an import loop. Key names:
``models/state_dict_adapter.py`` (``hf_llama_key_map`` and its inverse ``hf_llama_export_map``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from vlpretrain.checkpoint.hf_dir import Source, check_entries, entries_of, torch_dtype_name, write_dir
from vlpretrain.config import ModelConfig
from vlpretrain.models.state_dict_adapter import hf_llama_export_map

# transformers' LlamaConfig defaults: the released DeepSeek-VL language_config only lists a few fields
LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "rms_norm_eps": 1e-6,
                  "max_position_embeddings": 2048, "tie_word_embeddings": False, "hidden_act": "silu",
                  "attention_bias": False, "mlp_bias": False, "model_type": "llama"}


def hf_llama_config(cfg: ModelConfig, dtype: torch.dtype | str | None = None) -> dict:
    """The LlamaConfig dict of our decoder, every field we depend on written explicitly."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "torch_dtype": torch_dtype_name(dtype),
    }


def export_hf_llama(model_or_state: Source, cfg: ModelConfig, out_dir: str | Path, shard_bytes: int = 5 << 30,
                    dtype: torch.dtype | None = None) -> Path:
    """Write the language model as a HF ``LlamaForCausalLM`` directory: config.json (``hf_llama_config``) and
    safetensors with HF names, one ``model.safetensors`` or, above ``shard_bytes``, ``model-0000i-of-0000n``
    shards with ``model.safetensors.index.json``. ``model_or_state``: a model, a state dict (our names) or our
    weights file / checkpoint dir. Vision and adaptor tensors are not written. Returns the directory."""
    ours = entries_of(model_or_state)
    to_hf = hf_llama_export_map(cfg.n_layers)
    check_entries(ours, cfg, list(to_hf), "export_hf_llama")
    config = hf_llama_config(cfg, dtype or ours["embed.tok_embeddings.weight"].dtype)
    return write_dir(out_dir, config, {to_hf[k]: ours[k] for k in to_hf}, shard_bytes, dtype)
