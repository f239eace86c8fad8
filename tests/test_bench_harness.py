"""bench/_ab.py: interleaving order, medians and spreads, the ratio convention, the final JSON line (no timing)."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import _ab  # noqa: E402


def test_summarize_median_and_spread():
    assert _ab.summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert _ab.summarize([4, 1, 2, 3])["median"] == 2.5
    with pytest.raises(ValueError):
        _ab.summarize([])


def test_compare_ratio_of_medians_and_per_repeat_spread():
    c = _ab.compare([10.0, 12.0, 11.0], [5.0, 8.0, 4.0])
    assert c["ratio"] == pytest.approx(11.0 / 5.0)  # medians 11 and 5, not the median of the ratios
    assert c["ratios"] == pytest.approx([2.0, 1.5, 2.75])
    assert (c["ratio_min"], c["ratio_max"]) == pytest.approx((1.5, 2.75))
    with pytest.raises(ValueError):
        _ab.compare([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        _ab.compare([1.0], [0.0])


def test_interleave_runs_warmup_then_alternates():
    calls = []

    def variant(name, values):
        it = iter(values)

        def fn():
            calls.append(name)
            return next(it)
        return fn

    res = _ab.interleave({"a": variant("a", [0, 1, 2, 3]), "b": variant("b", [{"x": 9}, {"x": 5}, {"x": 6},
                                                                              {"x": 7}])}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4  # one warm-up round, then A B A B A B
    assert res == {"a": [{"value": 1.0}, {"value": 2.0}, {"value": 3.0}], "b": [{"x": 5}, {"x": 6}, {"x": 7}]}
    with pytest.raises(ValueError):
        _ab.interleave({"a": lambda: 1.0}, repeats=0)


def test_record_fields_and_goal():
    res = {"ours": [{"tps": 100.0}, {"tps": 110.0}, {"tps": 90.0}],
           "hf": [{"tps": 100.0}, {"tps": 100.0}, {"tps": 100.0}]}
    rec = _ab.record("decoder_vs_hf", {"threads": 2}, res, "ours", "hf", "tps", goal=1.0, extra="x")
    assert rec["bench"] == "decoder_vs_hf" and rec["threads"] == 2 and rec["extra"] == "x"
    assert (rec["ratio"], rec["ratio_min"], rec["ratio_max"], rec["repeats"]) == (1.0, 0.9, 1.1, 3)
    assert (rec["ours_median"], rec["ours_min"], rec["ours_max"], rec["hf_median"]) == (100.0, 90.0, 110.0, 100.0)
    assert rec["goal"] == 1.0 and rec["goal_met"] is True
    assert "NOT met" in _ab.ratio_line(_ab.record("b", {}, res, "hf", "ours", "tps", goal=1.2))
    assert "goal" not in _ab.record("b", {}, res, "ours", "hf", "tps")


def test_table_lists_every_variant_and_figure():
    res = {"grouped": [{"seq_per_s": 2.0, "step_s": 0.5}], "mixed": [{"seq_per_s": 1.0, "step_s": 1.0}]}
    text = _ab.table(res, ["seq_per_s", "step_s"])
    lines = text.splitlines()
    assert len(lines) == 3 and "seq_per_s" in lines[0] and "step_s" in lines[0]
    assert lines[1].startswith("grouped") and lines[2].startswith("mixed")


def test_emit_prints_one_json_line_headline_with_settings():
    res = {"g": [{"v": 2.0}], "m": [{"v": 1.0}]}
    recs = [_ab.record("modality_grouping", {"dp": dp}, res, "g", "m", "v") for dp in (1, 2)]
    buf = io.StringIO()
    _ab.emit(recs, file=buf)
    out = buf.getvalue()
    assert out.count("\n") == 1
    top = json.loads(out)
    assert top["bench"] == "modality_grouping" and top["dp"] == 2 and top["ratio"] == 2.0
    assert [s["dp"] for s in top["settings"]] == [1, 2]
    buf = io.StringIO()
    _ab.emit(recs[:1], file=buf)
    assert "settings" not in json.loads(buf.getvalue())
    assert _ab.final_record(recs, headline=0)["dp"] == 1
