"""Checks of a built config: each field's declared rules (ranges, lengths), then the rules across keys
(heads and widths, image grids, sequence lengths, the layout rules of ``layout_rules.py``). Every failure is a
``ConfigError`` with one line naming the key, raised before any expensive work starts.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from vlpretrain.config.schema import Config
from vlpretrain.errors import UserError
from vlpretrain.layout_rules import dp_shard_problem, microbatch_problem, schedule_problem, split_problem


class ConfigError(UserError, ValueError):
    """A bad config: the message is one line (``config error: <key>: ...``) that names the offending key."""

    def __init__(self, msg: str = ""):
        super().__init__(re.sub(r"\s*\n\s*", " ", str(msg)).strip())  # one line, whatever was interpolated


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config error: {key}: {msg}")


def _problem(found: tuple[str, str] | None) -> None:
    """Raise the (key, message) a layout rule of layout_rules.py found, if any."""
    if found is not None:
        _check(False, *found)


_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _bounds_text(rules: dict) -> str:
    low = next(((op, rules[op]) for op in ("ge", "gt") if op in rules), None)
    high = next(((op, rules[op]) for op in ("le", "lt") if op in rules), None)
    if low and high:
        return f"must lie in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    op, bound = low or high
    return f"must be {_BOUNDS[op][0]} {bound}"


def check_rules(obj: Any, prefix: str = "") -> None:
    """Check every field's declared rules (``_f(..., ge=1)``), recursing into sections and lists of them."""
    for f in dataclasses.fields(obj):
        key, value, rules = f"{prefix}.{f.name}" if prefix else f.name, getattr(obj, f.name), f.metadata
        if dataclasses.is_dataclass(value):
            check_rules(value, key)
            continue
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                check_rules(item, f"{key}[{i}]")
            continue
        if rules.get("nonempty") and isinstance(value, (str, list)):
            _check(len(value) > 0, key, "must not be empty")
        if "len" in rules and isinstance(value, list):
            _check(len(value) == rules["len"], key, f"needs {rules['len']} values, got {len(value)}")
        bounds = {op: b for op, b in rules.items() if op in _BOUNDS}
        if not bounds:
            continue
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
        for k, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool):  # not None, not 'auto'
                _check(all(_BOUNDS[op][1](v, b) for op, b in bounds.items()), k,
                       f"{_bounds_text(bounds)}, got {v}")


def validate(cfg: Config) -> None:
    m, t, p, d = cfg.model, cfg.train, cfg.parallel, cfg.data
    check_rules(cfg)  # ranges first: the checks below divide by these values
    _check(m.dim % m.n_heads == 0, "model.dim", f"{m.dim} is not divisible by model.n_heads={m.n_heads}")
    _check(m.head_dim % 2 == 0, "model.dim", "head dim (dim / n_heads) must be even for rotary embeddings")
    _check(m.n_heads % m.kv_heads == 0, "model.n_kv_heads",
           f"{m.kv_heads} does not divide model.n_heads={m.n_heads}")
    _check(0 <= m.image_token_id < m.vocab_size, "model.image_token_id", f"{m.image_token_id} not in vocab")
    s = m.siglip
    _check(s.image_size % s.patch_size == 0, "model.siglip.image_size", "must be a multiple of patch_size")
    _check(s.width % s.heads == 0, "model.siglip.width", "must be divisible by heads")
    if m.sam.enabled:
        a = m.sam
        _check(a.image_size % a.patch_size == 0, "model.sam.image_size", "must be a multiple of patch_size")
        _check(a.width % a.heads == 0, "model.sam.width", "must be divisible by heads")
        _check(all(0 <= i < a.depth for i in a.global_attn_indexes), "model.sam.global_attn_indexes",
               f"indexes must lie in [0, {a.depth})")
        n_down = len(a.downsample_channels)
        _check(n_down >= 1, "model.sam.downsample_channels", "needs at least one conv")
        grid = a.interp_size
        for _ in range(n_down):
            grid = (grid - 1) // 2 + 1
        sig_grid = s.image_size // s.patch_size
        _check(grid == sig_grid, "model.sam.interp_size",
               f"{a.interp_size} halved {n_down} times gives a {grid}x{grid} grid, SigLIP gives {sig_grid}x{sig_grid}")
        _check(not a.hd_path or len(a.global_attn_indexes) > 0, "model.sam.hd_path",
               "needs a global-attention block")
    _check(t.seq_len <= m.max_seq_len, "train.seq_len", f"{t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check(t.seq_len > m.image_tokens, "train.seq_len",
           f"{t.seq_len} cannot hold one image ({m.image_tokens} tokens) and text")
    _check(not t.profile.steps or (len(t.profile.steps) == 2 and t.profile.steps[0] <= t.profile.steps[1]
                                   <= t.steps), "train.profile.steps",
           f"needs [first, last] with first <= last <= train.steps={t.steps}, got {t.profile.steps}")
    _check(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
           f"{t.global_batch_size} is not divisible by train.micro_batch_size={t.micro_batch_size}")
    if not m.sam.enabled:
        _check("sam" not in t.trainable, "train.trainable", "'sam' is trainable but model.sam.enabled is false")
    names: dict[str, int] = {}
    for i, src in enumerate(d.sources):  # a source's name defaults to its path (data/sources.py)
        name = src.name or src.path
        _check(name not in names, f"data.sources[{i}].name",
               f"'{name}' is already the name of data.sources[{names.get(name)}]")
        names[name] = i
    if isinstance(p.layer_split, list):
        bad = split_problem(p.layer_split, m.n_layers, p.pp * p.vpp)
        _check(bad is None, "parallel.layer_split", bad or "")
    # name the key the user most likely set: pp alone, or vpp on top of it
    _check(p.pp * p.vpp <= m.n_layers + 2, "parallel.vpp" if p.vpp > 1 else "parallel.pp",
           f"pp x vpp = {p.pp * p.vpp} virtual stages exceed the {m.n_layers + 2} model parts "
           f"(embed, {m.n_layers} layers, head)")
    _check(m.n_heads % p.tp == 0 and m.kv_heads % p.tp == 0, "parallel.tp",
           f"{p.tp} does not divide the attention heads ({m.n_heads} q, {m.kv_heads} kv)")
    _check(m.ffn_dim % p.tp == 0, "parallel.tp", f"{p.tp} does not divide model.ffn_dim={m.ffn_dim}")
    _check(m.vocab_size % p.tp == 0, "parallel.tp", f"{p.tp} does not divide model.vocab_size={m.vocab_size}")
    _problem(schedule_problem(p.schedule, p.pp, p.vpp))  # the schedule table (layout_rules.py)
    if isinstance(p.dp, int):  # (dp: auto is checked with the world size, by mesh.resolve_layout)
        _problem(microbatch_problem(t.global_batch_size, t.micro_batch_size, p.dp, p.pp, p.vpp, p.schedule))
        _problem(dp_shard_problem(p.dp_shard, p.dp))
    # transformer-engine (models/te.py): FP8 runs through it; it composes with dp (FSDP2) and pp, not with our TP
    _check(not p.fp8 or m.impl == "te", "parallel.fp8", "FP8 runs through transformer-engine: set model.impl=te")
    _check(m.impl != "te" or p.tp == 1, "parallel.tp",
           f"model.impl=te needs tp=1, got {p.tp}: our TP shards nn.Linear weights as DTensors, and TE's own TP "
           "groups would leave plain local shards that DCP cannot reshard on a layout-change resume; use dp/pp, "
           "or model.impl=torch")
    _check(not p.fp8 or all(n % 16 == 0 for n in (m.dim, m.ffn_dim, m.kv_heads * m.head_dim)), "parallel.fp8",
           f"FP8 GEMMs need model.dim, model.ffn_dim and the kv width divisible by 16, got {m.dim}, {m.ffn_dim}, "
           f"{m.kv_heads * m.head_dim}")
