"""The data state under a changed data configuration, and excluded samples (issue 23, sections 2 and 6):

* the planner state knows sources by name and content (``plan_state.py``): a changed weight, an added, removed,
  re-added, renamed or swapped source, changed files, seq_len, packing, grouping or language ratio each continue
  under their stated rule with one line; a changed seed is refused with one line naming train.seed; a state of the
  older positional kind still loads for the same sources and is refused with one line for others;
* the summary's skipped counts never list a renamed source twice;
* ``exclude`` / ``data.skip_samples``: an excluded sample is never drawn, planning stays deterministic (excluding
  before its draw changes nothing before it), the exclusion survives a save and a dp change, packed too;
* ``describe`` and ``data_tools inspect --sample`` show one sample;
* the CLI: ``vlpretrain train --resume auto`` with an edited data section prints the one line, no traceback.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY

from vlpretrain.config import ConfigError, load_config
from vlpretrain.data.loader import DataPipeline
from vlpretrain.data.step_plan import StepPlanner

SOURCES = ["{name: interleaved, path: shards/interleaved-*.tar, modality: multimodal, weight: 15.2}",
           "{name: captions, path: shards/captions-*.tar, modality: multimodal, weight: 11.1}",
           "{name: ocr, path: shards/ocr-*.tar, modality: multimodal, weight: 3.0}",
           "{name: text, path: corpus/text, modality: text, weight: 70.0}"]


def _cfg(demo_dir: Path, *overrides: str, sources: list[str] = SOURCES):
    return load_config(TINY / "stage2.yaml", [
        f"data.root={demo_dir}", "train.init_from=", "train.eval_file=", "train.global_batch_size=8",
        "train.micro_batch_size=2", "train.seq_len=128", "data.packing=false", "data.num_workers=0",
        "data.language_ratio={start: 0.5, end: 0.5, warmup_steps: 0, shape: linear}",
        f"data.sources=[{', '.join(sources)}]", *overrides])


def _saved(demo_dir, tok, steps: int = 3, *overrides: str, sources: list[str] = SOURCES) -> dict:
    p = StepPlanner(_cfg(demo_dir, *overrides, sources=sources), tok)
    for _ in range(steps):
        p.plan()
    return json.loads(json.dumps(p.state_dict()))  # as a checkpoint holds it


def _resume(demo_dir, tok, state, *overrides: str, sources: list[str] = SOURCES) -> tuple[StepPlanner, list[str]]:
    p = StepPlanner(_cfg(demo_dir, *overrides, sources=sources), tok)
    return p, p.load_state_dict(copy.deepcopy(state))


def _counter(p: StepPlanner, name: str) -> int:
    return p.planner.counters[[s.name for s in p.sources].index(name)]


def _draws(plans, p: StepPlanner) -> dict[str, list[int]]:
    """Every source's drawn sample indices, in order."""
    out: dict[str, list[int]] = {}
    for plan in plans:
        for s, i in plan.table[:, :2].tolist():
            out.setdefault(p.sources[s].name, []).append(i)
    return out


def test_unchanged_config_resumes_silently_and_exactly(demo_dir, tokenizer):
    ref = StepPlanner(_cfg(demo_dir), tokenizer)
    plans = [ref.plan() for _ in range(6)]
    state = json.loads(json.dumps(plans[2].totals["data_state"]))
    p, notes = _resume(demo_dir, tokenizer, state)
    assert notes == []
    for want in plans[3:]:
        got = p.plan()
        assert np.array_equal(got.table, want.table) and got.totals["samples_digest"] == want.totals["samples_digest"]


def test_weight_change_continues_with_one_line(demo_dir, tokenizer):
    state = _saved(demo_dir, tokenizer)
    sources = [SOURCES[0], SOURCES[1].replace("11.1", "30"), *SOURCES[2:]]
    p, notes = _resume(demo_dir, tokenizer, state, sources=sources)
    assert notes == ["data source 'captions': weight 11.1 -> 30: the mix follows the new weights from step 4"]
    for name, e in state["sources"].items():  # every source where it was
        assert _counter(p, name) == e["counter"]
    assert p.planner.choosers["multimodal"].counts == [0, 0, 0]  # the mix restarts with the new weights
    p.plan()


def test_added_source_starts_at_its_beginning(demo_dir, tokenizer):
    state = _saved(demo_dir, tokenizer, sources=[s for s in SOURCES if "ocr" not in s])
    p, notes = _resume(demo_dir, tokenizer, state)
    assert notes == ["data source 'ocr' is new: it starts at its beginning"]
    assert _counter(p, "ocr") == 0
    assert all(_counter(p, n) == e["counter"] for n, e in state["sources"].items())
    keys = [e["order_key"] for e in p.state_dict()["sources"].values()]
    assert len(set(keys)) == len(keys)  # its own order, no other source's
    for _ in range(4):
        p.plan()
    assert _counter(p, "ocr") > 0


def test_removed_source_is_kept_and_continues_when_added_again(demo_dir, tokenizer):
    state = _saved(demo_dir, tokenizer)
    without = [s for s in SOURCES if "ocr" not in s]
    p, notes = _resume(demo_dir, tokenizer, state, sources=without)
    assert notes == ["data source 'ocr' is no longer configured: the others continue; its position is kept "
                     "(added again, it continues there)"]
    assert all(_counter(p, n) == state["sources"][n]["counter"] for n in ("interleaved", "captions", "text"))
    for _ in range(2):
        p.plan()
    later = json.loads(json.dumps(p.state_dict()))
    assert later["retired"]["ocr"]["counter"] == state["sources"]["ocr"]["counter"]
    back, notes = _resume(demo_dir, tokenizer, later)
    assert notes == ["data source 'ocr' is back: it continues where it was when it was removed"]
    assert _counter(back, "ocr") == state["sources"]["ocr"]["counter"]
    assert "ocr" not in back.state_dict()["retired"]


def test_swapped_sources_keep_their_own_positions(demo_dir, tokenizer, tmp_path):
    """Two sources of equal size swapped in the list: each continues its own order (by name), drawing exactly
    what it would have drawn in the unswapped run."""
    for name in ("a", "b"):
        lines = [json.dumps({"text": f"{name} sample {i} " + "word " * (3 + i % 5), "images": []}) for i in range(40)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    two = [f"{{name: a, path: {tmp_path}/a.jsonl, modality: text, weight: 2.0}}",
           f"{{name: b, path: {tmp_path}/b.jsonl, modality: text, weight: 1.0}}", SOURCES[1]]
    swapped = [two[1], two[0], two[2]]
    ref = StepPlanner(_cfg(demo_dir, sources=two), tokenizer)
    for _ in range(3):
        ref.plan()
    state = json.loads(json.dumps(ref.state_dict()))
    assert state["sources"]["a"]["counter"] != state["sources"]["b"]["counter"]
    p, notes = _resume(demo_dir, tokenizer, state, sources=swapped)
    assert notes == []
    assert [_counter(p, n) for n in "ab"] == [state["sources"][n]["counter"] for n in "ab"]
    same = _draws([ref.plan() for _ in range(6)], ref)
    got = _draws([p.plan() for _ in range(6)], p)
    for n in "ab":  # the same samples in the same order (the source choices may interleave differently)
        k = min(len(same[n]), len(got[n]))
        assert k > 5 and got[n][:k] == same[n][:k]


def test_renamed_source_is_recognised_by_its_files(demo_dir, tokenizer):
    state = _saved(demo_dir, tokenizer, 8)  # some samples are too long: skipped, counted
    assert state["bad_total"]["interleaved"] > 0
    sources = [SOURCES[0].replace("name: interleaved", "name: inter"), *SOURCES[1:]]
    p, notes = _resume(demo_dir, tokenizer, state, sources=sources)
    assert notes == ["data source 'inter' has the files of 'interleaved' (renamed): it continues where "
                     "'interleaved' was"]
    assert _counter(p, "inter") == state["sources"]["interleaved"]["counter"]
    p.plan()
    saved = p.state_dict()
    # the run's skip counts under the new name only (the summary's skipped_samples lists each source once)
    assert set(saved["bad_total"]) == {"inter", "captions", "ocr", "text"}
    assert saved["bad_total"]["inter"] >= state["bad_total"]["interleaved"]
    assert "interleaved" not in saved["retired"]


def test_changed_files_restart_the_source(demo_dir, tokenizer):
    state = _saved(demo_dir, tokenizer)
    sources = [SOURCES[0], SOURCES[1].replace("captions-*", "ocr-*"), *SOURCES[2:]]
    p, notes = _resume(demo_dir, tokenizer, state, sources=sources)
    assert notes == [f"data source 'captions': its files (data.sources[1]) changed since the checkpoint: it restarts "
                     f"at its beginning ({state['sources']['captions']['counter']} draws of the old files are not "
                     f"continued)"]
    assert _counter(p, "captions") == 0 and _counter(p, "ocr") == state["sources"]["ocr"]["counter"]
    p.plan()


def test_seq_len_change_continues_and_recuts_corpora(demo_dir, tokenizer):
    state = _saved(demo_dir, tokenizer, 5)
    p, notes = _resume(demo_dir, tokenizer, state, "train.seq_len=192")
    assert len(notes) == 1 and notes[0].startswith("train.seq_len 128 -> 192: sources continue where they were; "
                                                   "samples longer than 192 tokens are skipped")
    assert "indexed corpora (text) are re-cut into chunks of 192 tokens" in notes[0]
    for name in ("interleaved", "captions", "ocr"):
        assert _counter(p, name) == state["sources"][name]["counter"]
    old, n = state["sources"]["text"], p.planner.sizes[3]
    assert n != old["size"] and _counter(p, "text") == old["counter"] * n // old["size"]  # the epoch share kept
    p.plan()


def test_packing_change_drops_the_waiting_sample(demo_dir, tokenizer):
    state = _saved(demo_dir, tokenizer, 4, "data.packing=true")
    assert state["carry"]
    p, notes = _resume(demo_dir, tokenizer, state)
    assert notes == ["data.packing true -> false: sources continue where they were; step 5 is the first unpacked "
                     "one", f"data: {len(state['carry'])} sample(s) drawn for the next packed step are dropped (they "
                     f"no longer fit the changed data configuration)"]
    assert all(_counter(p, n) == e["counter"] for n, e in state["sources"].items())
    assert p.plan().step == 5
    on, notes = _resume(demo_dir, tokenizer, _saved(demo_dir, tokenizer), "data.packing=true")
    assert notes == ["data.packing false -> true: sources continue where they were; step 4 is the first packed one"]


def test_seed_change_is_refused_with_one_line(demo_dir, tokenizer):
    state = _saved(demo_dir, tokenizer)
    with pytest.raises(ConfigError, match=r"^config error: train\.seed: the checkpoint's data order was drawn with "
                                          r"train\.seed=0; 7 would reorder"):
        _resume(demo_dir, tokenizer, state, "train.seed=7")


def test_language_ratio_and_grouping_changes_state_their_rule(demo_dir, tokenizer):
    state = _saved(demo_dir, tokenizer)
    p, notes = _resume(demo_dir, tokenizer, state, "data.language_ratio.end=0.8")
    assert notes == ["data.language_ratio {start: 0.5, end: 0.5, warmup_steps: 0, shape: linear} -> {start: 0.5, "
                     "end: 0.8, warmup_steps: 0, shape: linear}: the new schedule applies from step 4 (a function of "
                     "the global step: its warm-up counts from step 1)"]
    p, notes = _resume(demo_dir, tokenizer, state, "data.group_by_modality=false")
    assert notes == ["data.group_by_modality true -> false: steps are mixed from step 4; sources continue where they "
                     "were, the weighted mix restarts"]
    assert p.plan().modality == "mixed"


def test_older_positional_state_loads_for_the_same_sources(demo_dir, tokenizer):
    """A data_state saved before sources were known by name (positional, with "sizes")."""
    ref = StepPlanner(_cfg(demo_dir), tokenizer)
    for _ in range(3):
        ref.plan()
    sp = ref.planner.state_dict()
    old = {"planner": {k: sp[k] for k in ("step", "seed", "counters", "epochs", "chooser_counts", "sizes")},
           "language_steps": ref.planner.language_steps, "bad_total": dict(ref.bad_total), "carry": {}}
    old["planner"]["mixed_counts"] = [0] * 4
    p, notes = _resume(demo_dir, tokenizer, old)
    assert notes == []
    for _ in range(3):
        assert np.array_equal(p.plan().table, ref.plan().table)
    with pytest.raises(ConfigError, match=r"^config error: data\.sources: this checkpoint's data state is of an "
                                          r"older kind that knows sources by position only"):
        _resume(demo_dir, tokenizer, old, sources=SOURCES[:3])


# ---------------------------------------------------------------------------------------------------------------
# excluded samples


def _first_drawn_at(plans, step: int) -> tuple[int, int]:
    """A (source, index) first drawn at ``step`` (1-based) and never before."""
    before = {tuple(x) for plan in plans[:step - 1] for x in plan.table[:, :2].tolist()}
    return next(tuple(x) for x in plans[step - 1].table[:, :2].tolist() if tuple(x) not in before)


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_excluded_sample_is_never_drawn_and_planning_stays_deterministic(demo_dir, tokenizer, packing):
    pk = f"data.packing={str(packing).lower()}"
    ref = StepPlanner(_cfg(demo_dir, pk), tokenizer)
    plans = [ref.plan() for _ in range(12)]
    x = _first_drawn_at(plans, 9)
    name = ref.sources[x[0]].name
    p1 = StepPlanner(_cfg(demo_dir, pk), tokenizer)
    a = [p1.plan() for _ in range(5)]
    assert p1.exclude([x]) == 1 and p1.exclude([x]) == 0
    a += [p1.plan() for _ in range(7)]
    p2 = StepPlanner(_cfg(demo_dir, pk, f"data.skip_samples=['{name}:{x[1]}']"), tokenizer)
    b = [p2.plan() for _ in range(12)]
    for k in range(12):
        assert np.array_equal(a[k].table, b[k].table) and a[k].rows == b[k].rows, k
        assert tuple(x) not in {tuple(y) for y in a[k].table[:, :2].tolist()}
        if k < 8:  # nothing changes before its draw
            assert np.array_equal(a[k].table, plans[k].table)
    assert not np.array_equal(a[8].table, plans[8].table)
    state = p1.state_dict()
    assert state["sources"][name]["excluded"] == [x[1]] and state["excluded_total"][name] >= 1
    assert sum(state["excluded_total"].values()) == state["excluded_total"][name]


def test_exclusion_survives_a_save_and_a_dp_change(demo_dir, tokenizer):
    cfg = _cfg(demo_dir)
    ref = StepPlanner(cfg, tokenizer)
    x = _first_drawn_at([ref.plan() for _ in range(10)], 8)
    one = DataPipeline(cfg, tokenizer, load_images=False)
    assert one.exclude([x]) == 1
    for _ in range(4):
        next(one)
    state = json.loads(json.dumps(one.state_dict()))
    pipes = [DataPipeline(cfg, tokenizer, dp_rank=r, dp_size=2, load_images=False, state=state) for r in range(2)]
    assert all(p.resume_notes == [] for p in pipes)
    assert all(p.plans.excluded[x[0]] == {x[1]} for p in pipes)
    for _ in range(6):
        want = one.plans.plan()
        got = [p.plans.plan() for p in pipes]
        assert all(np.array_equal(g.table, want.table) for g in got)
        assert tuple(x) not in {tuple(y) for y in want.table[:, :2].tolist()}
    assert pipes[0].state_dict() == one.state_dict()


def test_skip_samples_are_checked_with_one_line(demo_dir, tokenizer):
    for entry, what in [("nope:1", "no source named 'nope'"), ("captions:x", "is not '<source name>:<sample index>'"),
                        ("captions:99999999", "has .* samples, no sample 99999999")]:
        with pytest.raises(ConfigError, match=rf"^config error: data\.skip_samples\[0\]: .*{what}"):
            StepPlanner(_cfg(demo_dir, f"data.skip_samples=['{entry}']"), tokenizer)


def test_describe_and_inspect_show_one_sample(demo_dir, tokenizer):
    p = StepPlanner(_cfg(demo_dir), tokenizer)
    d = p.describe(1, 3)
    assert d["source"] == "captions" and d["index"] == 3 and d["modality"] == "multimodal"
    assert d["shard"].endswith(".tar") and d["key"] == f"captions/{Path(d['shard']).stem}/{d['member_key']}"
    assert d["images"] >= 1 and d["tokens"] > d["images"] * p.image_tokens
    t = p.describe(3, 0)
    assert t["file"].endswith("text.bin") and t["document"] == 0 and t["images"] == 0
    cfg = TINY / "stage2.yaml"
    sets = ["--set", f"data.root={demo_dir}", "train.init_from=", "train.eval_file="]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "data_tools", "inspect", "--config", str(cfg), "--sample",
                          "captions:3", "--json", *sets], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    view = json.loads(out.stdout)
    assert view["key"] == d["key"] and isinstance(view["text"], str) and view["text"]
    assert len(view["image_files"]) == d["images"] and view["image_files"][0].startswith(d["shard"] + ":")
    bad = subprocess.run([sys.executable, "-m", "data_tools", "inspect", "--config", str(cfg), "--sample",
                          "nope:1", *sets], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --sample: no source named 'nope' (sources: interleaved, captions, ocr, sft, text)"]


# ---------------------------------------------------------------------------------------------------------------
# the CLI


def _train(run_dir: Path, demo_dir: Path, *overrides: str, resume: bool = False) -> subprocess.CompletedProcess:
    sets = [f"data.root={demo_dir}", f"train.run_dir={run_dir}", "train.init_from=", "train.eval_file=",
            "train.steps=2", "checkpoint.interval=1", "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.seq_len=128", "data.packing=false", "train.warmup_steps=1", "logging.log_interval=1000",
            f"data.sources=[{', '.join(SOURCES)}]", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "vlpretrain", "train", "--config", str(TINY / "stage2.yaml"), "--set", *sets]
    return subprocess.run(cmd + (["--resume", "auto"] if resume else []), env=env, capture_output=True, text=True,
                          timeout=600)


def test_cli_resume_with_an_edited_data_section(demo_dir, tmp_path):
    run = tmp_path / "run"
    first = _train(run, demo_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    edited = f"data.sources=[{SOURCES[0]}, {SOURCES[1].replace('11.1', '5')}, {SOURCES[3]}]"
    more = _train(run, demo_dir, "train.steps=3", edited, resume=True)
    assert more.returncode == 0, more.stderr[-3000:]
    lines = [x for x in more.stdout.splitlines() if x.startswith("resume: ")]
    assert lines == ["resume: data source 'captions': weight 11.1 -> 5: the mix follows the new weights from step 3",
                     "resume: data source 'ocr' is no longer configured: the others continue; its position is kept "
                     "(added again, it continues there)"]
    assert "Traceback" not in more.stderr
    seed = _train(run, demo_dir, "train.steps=4", edited, "train.seed=5", resume=True)
    assert seed.returncode == 2 and "Traceback" not in seed.stderr
    assert [x for x in seed.stderr.splitlines() if x.strip()][-1].startswith(
        "config error: train.seed: the checkpoint's data order was drawn with train.seed=0; 5 would reorder")
