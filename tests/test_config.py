"""Typed config: YAML composition, ``--set`` overrides, one-line errors naming the key, and the CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONFIGS, REPO, TINY

from vlpretrain.cli import main as cli_main
from vlpretrain.config import Config, ConfigError, config_from_dict, load_config, parse_overrides, trainable_parts

STAGE_FILES = sorted(CONFIGS.glob("*/stage*.yaml"))


def _error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(path, list(overrides))
    msg = str(ei.value)
    assert "\n" not in msg, f"config errors must be one line: {msg!r}"
    assert msg.startswith("config error: "), msg
    return msg


# ---------------------------------------------------------------------------------------------------------------
# every shipped config loads


def test_shipped_stage_files_exist():
    names = {f"{p.parent.name}/{p.name}" for p in STAGE_FILES}
    for model in ("tiny", "deepseek-vl-1.3b", "deepseek-vl-7b"):
        for stage in (1, 2, 3):
            assert f"{model}/stage{stage}.yaml" in names


@pytest.mark.parametrize("path", STAGE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_stage_file_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.train.stage == int(path.stem.removeprefix("stage"))
    # the model section comes from the included model.yaml
    assert cfg.model.name == path.parent.name
    model_yaml = yaml.safe_load((path.parent / "model.yaml").read_text())["model"]
    assert cfg.model.dim == model_yaml["dim"]
    assert cfg.model.n_layers == model_yaml["n_layers"]
    assert cfg.model.siglip.width == model_yaml["siglip"]["width"]
    # the typed values are really typed (YAML "1.0e-3" etc. became floats)
    assert type(cfg.train.lr) is float and cfg.train.lr > 0
    assert cfg.train.seq_len > cfg.model.image_tokens
    assert trainable_parts(cfg) == {1: ["adaptor"], 2: ["adaptor", "llm"],
                                    3: ["adaptor", "llm", "siglip"]}[cfg.train.stage]


def test_real_size_image_tokens():
    assert load_config(CONFIGS / "deepseek-vl-7b" / "stage2.yaml").model.image_tokens == 576
    assert load_config(CONFIGS / "deepseek-vl-7b" / "stage2.yaml").model.image_size == 1024
    c13 = load_config(CONFIGS / "deepseek-vl-1.3b" / "stage1.yaml").model
    assert (c13.image_tokens, c13.image_size, c13.sam.enabled) == (576, 384, False)


def test_include_gives_stage_file_the_model_section():
    cfg = load_config(TINY / "stage1.yaml")
    m = cfg.model
    assert (m.name, m.vocab_size, m.dim, m.n_layers, m.n_heads, m.ffn_dim) == ("tiny", 2048, 128, 4, 4, 344)
    assert (m.siglip.image_size, m.siglip.patch_size, m.siglip.width, m.siglip.depth) == (48, 8, 96, 3)
    assert (m.sam.window_size, m.sam.global_attn_indexes, m.sam.interp_size) == (6, [1, 3], 24)
    assert m.image_tokens == (48 // 8) ** 2 == 36
    # and the stage file's own sections
    assert (cfg.train.stage, cfg.train.steps, cfg.train.lr) == (1, 60, 3.0e-3)
    assert [s.name for s in cfg.data.sources] == ["captions", "ocr"]
    # untouched sections keep the dataclass defaults
    assert cfg.checkpoint.resume == "" and cfg.train.beta2 == 0.95


def test_include_composition_later_keys_win(tmp_path: Path):
    (tmp_path / "base.yaml").write_text(
        "model: {dim: 256, n_heads: 8, n_layers: 2}\ntrain: {steps: 5, seq_len: 1088}\n")
    (tmp_path / "more.yaml").write_text("include: base.yaml\nmodel: {n_layers: 3}\ntrain: {lr: 0.5}\n")
    (tmp_path / "top.yaml").write_text(
        "include: [more.yaml]\nmodel: {dim: 512}\ntrain: {steps: 7}\n")
    cfg = load_config(tmp_path / "top.yaml")
    # deep merge: dim from top, n_heads from base, n_layers from more; train.steps from top, lr from more
    assert (cfg.model.dim, cfg.model.n_heads, cfg.model.n_layers) == (512, 8, 3)
    assert (cfg.train.steps, cfg.train.lr) == (7, 0.5)
    # overrides win over every file
    cfg = load_config(tmp_path / "top.yaml", ["model.n_heads=16", "train.steps=9"])
    assert (cfg.model.dim, cfg.model.n_heads, cfg.model.n_layers, cfg.train.steps) == (512, 16, 3, 9)


# ---------------------------------------------------------------------------------------------------------------
# overrides


def test_overrides_scalars():
    cfg = load_config(TINY / "stage2.yaml", ["train.lr=1.0e-4", "parallel.tp=2", "train.init_from=",
                                             "data.group_by_modality=false", "parallel.dp=2"])
    assert cfg.train.lr == 1e-4 and type(cfg.train.lr) is float
    assert cfg.parallel.tp == 2 and cfg.parallel.dp == 2
    assert cfg.train.init_from == ""
    assert cfg.data.group_by_modality is False
    # ints widen to float fields, strings stay strings
    cfg = load_config(TINY / "stage2.yaml", ["train.lr=1", "data.root=/some/where", "parallel.dp=auto"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.data.root == "/some/where" and cfg.parallel.dp == "auto"


def test_override_exponent_without_dot_is_a_float():
    assert parse_overrides(["train.lr=1e-4"]) == {"train": {"lr": 1e-4}}
    cfg = load_config(TINY / "stage2.yaml", ["train.lr=1e-4", "parallel.tp=2"])
    assert cfg.train.lr == 1e-4 and cfg.parallel.tp == 2


def test_override_lists_with_pipeline_layout():
    cfg = load_config(TINY / "stage2.yaml", ["parallel.pp=2", "parallel.vpp=2", "parallel.schedule=interleaved_1f1b",
                                             "parallel.layer_split=[1,1,1,1]"])
    assert cfg.parallel.layer_split == [1, 1, 1, 1]
    assert (cfg.parallel.pp, cfg.parallel.vpp) == (2, 2)
    cfg = load_config(TINY / "stage2.yaml", ["parallel.pp=2", "parallel.layer_split=[3, 1]",
                                             "train.step_milestones=[0.5,0.75]", "train.trainable=[sam,llm]"])
    assert cfg.parallel.layer_split == [3, 1]
    assert cfg.train.step_milestones == [0.5, 0.75] and all(type(x) is float for x in cfg.train.step_milestones)
    assert trainable_parts(cfg) == ["sam", "llm"]
    # the literal alternatives of the same field still work
    assert load_config(TINY / "stage2.yaml", ["parallel.layer_split=uniform"]).parallel.layer_split == "uniform"


def test_parse_overrides_nesting():
    assert parse_overrides(["a.b.c=1", "a.b.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1, "d": "x"}}, "e": [1, 2]}
    with pytest.raises(ConfigError):
        parse_overrides(["train.lr"])  # no '='


# ---------------------------------------------------------------------------------------------------------------
# errors: one line, naming the key


@pytest.mark.parametrize("overrides, key", [
    # unknown keys, top level and nested
    (["foo=1"], "foo"),
    (["train.lrr=0.1"], "train.lrr"),
    (["model.siglip.foo=1"], "model.siglip.foo"),
    (["data.language_ratio.shapes=linear"], "data.language_ratio.shapes"),
    # wrong types
    (["train.steps=abc"], "train.steps"),
    (["train.steps=1.5"], "train.steps"),
    (["train.lr=true"], "train.lr"),
    (["data.group_by_modality=3"], "data.group_by_modality"),
    (["train.stage=4"], "train.stage"),
    (["train.stage=true"], "train.stage"),
    (["parallel.schedule=fancy"], "parallel.schedule"),
    (["parallel.layer_split=[1,x]"], "parallel.layer_split"),
    (["train.trainable=[vision]"], "train.trainable[0]"),
    (["model.siglip=3"], "model.siglip"),
    # impossible values
    (["train.global_batch_size=20"], "train.global_batch_size"),  # micro batch 8
    (["parallel.dp=3"], "train.global_batch_size"),  # 16 % (8 x 3)
    (["train.micro_batch_size=4", "parallel.dp=8"], "train.global_batch_size"),  # 16 % 32
    (["parallel.tp=3"], "parallel.tp"),  # 4 heads
    (["parallel.tp=8"], "parallel.tp"),
    (["parallel.pp=2", "parallel.vpp=2", "parallel.layer_split=[1,1,1,2]"], "parallel.layer_split"),  # sums to 5
    (["parallel.pp=2", "parallel.layer_split=[1,1,1,1]"], "parallel.layer_split"),  # 4 entries, pp x vpp = 2
    (["parallel.layer_split=[2,2]"], "parallel.layer_split"),  # pp = 1
    (["data.language_ratio.end=1.5"], "data.language_ratio.end"),
    (["data.language_ratio.start=-0.1"], "data.language_ratio.start"),
    (["train.seq_len=1024"], "train.seq_len"),  # max_seq_len 512
    (["train.seq_len=36"], "train.seq_len"),  # one image is 36 tokens
    (["train.seq_len=20"], "train.seq_len"),
    (["train.steps=0"], "train.steps"),
    (["train.lr=0"], "train.lr"),
    (["model.n_heads=3"], "model.dim"),  # 128 % 3
    (["model.image_token_id=5000"], "model.image_token_id"),
])
def test_bad_values_raise_one_line_naming_the_key(overrides, key):
    msg = _error(TINY / "stage2.yaml", overrides)
    assert key in msg, msg
    if key in ("foo", "train.lrr", "model.siglip.foo", "data.language_ratio.shapes"):
        assert msg == f"config error: unknown key '{key}'"
    else:
        assert msg.startswith(f"config error: {key}: "), msg


def test_error_messages_exact():
    assert _error(TINY / "stage2.yaml", ["train.steps=abc"]) == "config error: train.steps: expected int, got 'abc'"
    assert _error(TINY / "stage2.yaml", ["parallel.tp=3"]) == \
        "config error: parallel.tp: 3 does not divide the attention heads (4 q, 4 kv)"
    assert _error(TINY / "stage2.yaml", ["train.global_batch_size=20"]) == \
        "config error: train.global_batch_size: 20 is not divisible by train.micro_batch_size=8"
    assert _error(TINY / "stage2.yaml", ["parallel.pp=2", "parallel.vpp=2", "parallel.layer_split=[1,1,1,2]"]) == \
        "config error: parallel.layer_split: sums to 5, model has 4 layers"


def test_missing_file(tmp_path: Path):
    msg = _error(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "not found" in msg
    (tmp_path / "a.yaml").write_text("include: missing_model.yaml\n")
    msg = _error(tmp_path / "a.yaml")
    assert "missing_model.yaml" in msg


def test_include_cycle(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\ntrain: {steps: 3}\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    msg = _error(tmp_path / "a.yaml")
    assert "include cycle" in msg and "a.yaml" in msg
    (tmp_path / "self.yaml").write_text("include: self.yaml\n")
    assert "include cycle" in _error(tmp_path / "self.yaml")


def test_diamond_include_is_not_a_cycle(tmp_path: Path):
    (tmp_path / "m.yaml").write_text("model: {dim: 256}\ntrain: {seq_len: 1088}\n")
    (tmp_path / "x.yaml").write_text("include: m.yaml\n")
    (tmp_path / "y.yaml").write_text("include: m.yaml\n")
    (tmp_path / "top.yaml").write_text("include: [x.yaml, y.yaml]\n")
    assert load_config(tmp_path / "top.yaml").model.dim == 256


def test_dataclass_defaults_are_a_valid_config():
    cfg = load_config()
    assert cfg == Config()


def test_bad_yaml_and_non_mapping(tmp_path: Path):
    (tmp_path / "bad.yaml").write_text("train: {steps: [1, 2\n")
    assert "invalid YAML" in _error(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert "mapping" in _error(tmp_path / "list.yaml")


def test_yaml_round_trip(tmp_path: Path):
    cfg = load_config(CONFIGS / "deepseek-vl-7b" / "stage2.yaml", ["parallel.tp=2"])
    (tmp_path / "dump.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "dump.yaml") == cfg
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_config_show(capsys):
    rc = cli_main(["config", "show", str(TINY / "stage1.yaml"), "--set", "train.lr=0.5", "parallel.tp=2"])
    out = capsys.readouterr()
    assert rc == 0 and out.err == ""
    shown = yaml.safe_load(out.out)
    assert shown["train"]["lr"] == 0.5
    assert shown["parallel"]["tp"] == 2
    assert shown["model"]["name"] == "tiny" and shown["train"]["stage"] == 1
    assert config_from_dict(shown) == load_config(TINY / "stage1.yaml", ["train.lr=0.5", "parallel.tp=2"])


def test_cli_bad_key_exits_2_with_one_line(capsys):
    rc = cli_main(["config", "show", str(TINY / "stage1.yaml"), "--set", "train.lrr=0.5"])
    out = capsys.readouterr()
    assert rc == 2 and out.out == ""
    assert out.err == "config error: unknown key 'train.lrr'\n"


def test_cli_subprocess():
    cmd = [sys.executable, "-m", "vlpretrain", "config", "show", "configs/tiny/stage1.yaml", "--set", "train.lr=0.5"]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["train"]["lr"] == 0.5
    bad = subprocess.run(cmd[:-1] + ["model.siglip.foo=1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    lines = bad.stderr.splitlines()
    assert lines == ["config error: unknown key 'model.siglip.foo'"], bad.stderr


# ---------------------------------------------------------------------------------------------------------------
# malformed files: includes, non-mappings, duplicate keys (issue 8)


@pytest.mark.parametrize("text, expected", [
    ("include: 5\n", "include must be a file name or a list of file names, got 5"),
    ("include: [null]\n", "include must be a file name or a list of file names, got [None]"),
    ("include: ['']\n", "include must be a file name or a list of file names"),
    ("include: {a: 1}\n", "include must be a file name or a list of file names"),
    ("42\n", "top level must be a mapping, got int"),
    ("'just text'\n", "top level must be a mapping, got str"),
    ("train: {lr: 1.0e-3}\ntrain: {steps: 3}\n", "duplicate key 'train' (lines 1 and 2)"),
    ("train:\n  lr: 1.0e-3\n  steps: 3\n  lr: 2.0e-3\n", "duplicate key 'train.lr' (lines 2 and 4)"),
    ("data:\n  sources:\n    - {name: a, path: x, name: b}\n", "duplicate key 'data.sources[0].name'"),
])
def test_malformed_files_one_line(tmp_path: Path, text, expected):
    (tmp_path / "c.yaml").write_text(text)
    msg = _error(tmp_path / "c.yaml")
    assert str(tmp_path / "c.yaml") in msg and expected in msg, msg


def test_included_file_errors_name_that_file(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("include: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("model: {dim: 64}\nmodel: {dim: 32}\n")
    assert _error(tmp_path / "a.yaml") == f"config error: {tmp_path / 'b.yaml'}: duplicate key 'model' (lines 1 and 2)"
    (tmp_path / "b.yaml").write_text("- 1\n")
    assert _error(tmp_path / "a.yaml") == f"config error: {tmp_path / 'b.yaml'}: top level must be a mapping, got list"
    (tmp_path / "a.yaml").write_text("include: [gone.yaml]\n")
    assert _error(tmp_path / "a.yaml") == \
        f"config error: file not found: {tmp_path / 'gone.yaml'} (included from {tmp_path / 'a.yaml'})"
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    assert "cannot read" in _error(tmp_path / "bin.yaml")


def test_yaml_merge_keys_and_anchors_are_not_duplicates(tmp_path: Path):
    (tmp_path / "c.yaml").write_text(
        "train: &t {steps: 3, lr: 1.0e-3}\ncheckpoint: {interval: 0}\n"
        "data:\n  language_ratio: {<<: {start: 1.0, end: 0.5}, end: 0.7}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.train.steps, cfg.data.language_ratio.start, cfg.data.language_ratio.end) == (3, 1.0, 0.7)


def test_duplicate_key_in_an_override_and_cli(capsys):
    msg = _error(TINY / "stage2.yaml", ["data.language_ratio={start: 1.0, start: 0.5}"])
    assert msg == "config error: override 'data.language_ratio': duplicate key 'data.language_ratio.start' " \
                  "(line 1)"
    rc = cli_main(["config", "show", str(TINY / "stage2.yaml"), "--set", "parallel.pp=9"])
    out = capsys.readouterr()
    assert rc == 2 and out.err == "config error: parallel.pp: pp x vpp = 9 virtual stages exceed the 6 model " \
                                  "parts (embed, 4 layers, head)\n"
