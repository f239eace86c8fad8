"""docs/configuration.md is generated from vlpretrain/config/schema.py (vlpretrain/config_reference.py) and must
stay so: the committed page equals ``render()``, every key of ``Config`` is on it, and every field says what it
means."""
from __future__ import annotations

import dataclasses
import typing

from conftest import REPO

from vlpretrain import config_reference
from vlpretrain.config import Config

PAGE = REPO / "docs" / "configuration.md"


def _fields(cls: type, prefix: str = ""):
    """(key, field, is_leaf) for every field under ``cls``, walked here independently of the generator."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}.{f.name}" if prefix else f.name, hints[f.name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp):
            yield key, f, False
            yield from _fields(tp, key)
        elif item is not None and dataclasses.is_dataclass(item):
            yield key, f, False
            yield from _fields(item, f"{key}[]")
        else:
            yield key, f, True


def test_committed_page_is_current():
    expected = config_reference.render()
    assert PAGE.is_file(), f"{PAGE} is missing: run `{config_reference.REGENERATE}`"
    assert PAGE.read_text(encoding="utf-8") == expected, (
        f"{PAGE.relative_to(REPO)} is stale (vlpretrain/config/schema.py changed): run `{config_reference.REGENERATE}` "
        "and commit the page")


def test_every_leaf_key_is_on_the_page():
    page = config_reference.render()
    leaves = [key for key, _, leaf in _fields(Config) if leaf]
    assert len(leaves) > 90  # the walk found the nested sections
    missing = [key for key in leaves if f"| `{key}` |" not in page]
    assert not missing, f"keys missing from the reference: {missing}"
    assert sorted(config_reference.leaf_keys()) == sorted(leaves)


def test_every_field_has_a_meaning():
    """A field added without ``help=`` fails here: the reference would have an empty meaning."""
    empty = [key for key, f, _ in _fields(Config) if not str(f.metadata.get("help", "")).strip()]
    assert not empty, f"fields without help= in vlpretrain/config/schema.py: {empty}"
    one_line = [key for key, f, _ in _fields(Config) if "\n" in f.metadata["help"]]
    assert not one_line, f"help= must be one line: {one_line}"


def test_rules_and_choices_are_rendered():
    page = config_reference.render()
    assert "| `parallel.dp` | int or str | `auto` | `auto` or >= 1 |" in page
    assert "| `train.min_lr_ratio` | float | `0.1` | in [0, 1] |" in page
    assert "| `model.siglip.mean` | list[float] | `[0.5, 0.5, 0.5]` | each in [0, 1]; 3 values |" in page
    assert "| `parallel.layer_split` | str or list[int] | `auto` | `uniform`, `auto` or a list, each >= 0 |" in page
    assert "| `train.eps` | float | `1e-8` | > 0 |" in page


def test_check_mode(tmp_path, capsys):
    out = tmp_path / "configuration.md"
    assert config_reference.main(["--check", "--out", str(out)]) == 1  # missing
    assert config_reference.REGENERATE in capsys.readouterr().err
    assert config_reference.main(["--out", str(out)]) == 0
    assert config_reference.main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text().replace("decoder hidden size", "hidden size"))
    assert config_reference.main(["--check", "--out", str(out)]) == 1
    assert "stale" in capsys.readouterr().err
