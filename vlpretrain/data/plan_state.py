"""The step planner's state, by source name and content, and how a resumed run applies it to a changed data
configuration.

Saved after every step (so it stays small): per source, by name, its content id (``Source.content_id``: the
files its sample indices refer to), size, order key (keys its shuffled order per epoch), draw counter, modality,
weight and excluded samples; the draws skipped as bad (``bad_total``) or excluded (``excluded_total``), by name;
the weighted choosers' counts by name; the mixed slots' language target; the packed samples waiting for their
next step, by name; the settings the plan depends on (train.seed, train.seq_len, data.packing,
data.group_by_modality, data.language_ratio). Identical on every rank, whatever the layout.

Resuming (``load``) under a changed configuration: one line per change, returned for the caller to print once;
never a silent change of meaning:

* ``train.seed`` changed: refused (it keys every source's order: the epoch in progress would be redrawn);
* a source known by name with the same content continues where it was, wherever it is in the list;
* a source's weight changed: the sources continue; the weighted mix of its modality restarts with the new
  weights (the quota method from zero: no burst to catch up with the old counts);
* a source added: it starts at its beginning (the mix of its modality restarts);
* a source removed: the others continue; its state is kept ("retired") and a source with its name or its
  content added later continues where it was;
* same content, new name (the old name no longer configured): renamed, it continues; its counts move to the
  new name;
* same name, other content (its files changed): it restarts at its beginning; its excluded samples are dropped
  (they named samples of the old files);
* ``train.seq_len`` changed: sources continue; samples longer than the new length are skipped (counted); an
  indexed corpus, cut into chunks of seq_len, is re-cut: it keeps its epoch and the share of it drawn, in the new
  chunks' order, its excluded chunks dropped; a waiting packed sample that no longer fits is dropped;
* ``data.packing`` changed: sources continue; turned off, the waiting packed samples are dropped;
* ``data.group_by_modality`` changed: sources continue; steps follow the new mode from the next step, the mix
  restarts, waiting packed samples of the other mode are dropped;
* ``data.language_ratio`` changed: the new schedule applies from the next step (a function of the global step:
  its warm-up counts from step 1).

A state from before names were kept (positional, with "sizes") still loads for the same sources; for any other
it is refused with one line.
"""
from __future__ import annotations

from dataclasses import asdict

from vlpretrain.config import ConfigError

VERSION = 2


def save(p) -> dict:
    """``p``: the ``step_plan.StepPlanner`` (not imported: it imports this module)."""
    sp, cfg = p.planner, p.cfg
    sources = {src.name: {"content": p.content_ids[i], "size": sp.sizes[i], "order_key": sp.order_keys[i],
                          "counter": sp.counters[i], "modality": src.modality, "weight": src.cfg.weight,
                          "excluded": sorted(p.excluded[i])}
               for i, src in enumerate(p.sources)}
    return {"version": VERSION, "step": sp.step, "language_steps": sp.language_steps, "seed": sp.seed,
            "seq_len": cfg.train.seq_len, "packing": cfg.data.packing, "group_by_modality": cfg.data.group_by_modality,
            "language_ratio": asdict(cfg.data.language_ratio), "sources": sources, "retired": dict(p.retired),
            "bad_total": dict(p.bad_total), "excluded_total": dict(p.excluded_total),
            "choosers": {m: {p.sources[sp.by_modality[m][j]].name: c for j, c in enumerate(ch.counts)}
                         for m, ch in sp.choosers.items()},
            "mixed": sp.mixed.state_dict(),
            "carry": {m: [p.sources[s.source].name, s.index] for m, s in p.carry.items()},
            "planner": {"step": sp.step, "epochs": sp.epochs()}}  # (read by `vlpretrain ckpt info`)


def _refuse_seed(saved: int, now: int) -> None:
    if saved != now:
        raise ConfigError(f"config error: train.seed: the checkpoint's data order was drawn with train.seed={saved}; "
                          f"{now} would reorder every source in mid-epoch: resume with train.seed={saved}, or "
                          f"start a new run")


def load(p, state: dict) -> list[str]:
    if state.get("version") != VERSION:
        return _load_positional(p, state)
    cfg, sp = p.cfg, p.planner
    _refuse_seed(state["seed"], cfg.train.seed)
    saved, retired = state["sources"], state.get("retired", {})
    pool = {**retired, **saved}
    names = [s.name for s in p.sources]
    match = _match(p, pool, set(saved), names)
    notes: list[str] = []
    nxt = max([e["order_key"] for e in pool.values()] + [-1]) + 1
    recut = []
    bad, excl = state.get("bad_total", {}), state.get("excluded_total", {})
    p.bad_total, p.excluded_total = {n: 0 for n in names}, {n: 0 for n in names}
    for i, (name, (kind, old)) in enumerate(zip(names, match)):
        key = f"data.sources[{i}]" if not cfg.data.manifest else f"the manifest's source '{name}'"
        p.excluded[i] = set()
        if kind == "new":
            sp.order_keys[i], sp.counters[i] = nxt, 0
            nxt += 1
            notes.append(f"data source '{name}' is new: it starts at its beginning")
            continue
        e = pool[old]
        sp.order_keys[i] = e["order_key"]
        p.bad_total[name], p.excluded_total[name] = bad.get(old, 0), excl.get(old, 0)
        if kind == "changed":
            sp.counters[i] = 0
            notes.append(f"data source '{name}': its files ({key}) changed since the checkpoint: it restarts at "
                         f"its beginning ({e['counter']} draws of the old files are not continued)")
            continue
        sp.counters[i], n = e["counter"], sp.sizes[i]
        if e["size"] != n:  # the same corpus cut into other chunks (seq_len): keep the epoch and its share drawn
            epoch, at = divmod(e["counter"], e["size"])
            sp.counters[i] = epoch * n + at * n // e["size"]
            recut.append(name)
        else:
            p.excluded[i] = {int(x) for x in e["excluded"]}
        if kind == "renamed":
            notes.append(f"data source '{name}' has the files of '{old}' (renamed): it continues where '{old}' was")
        elif kind == "readded":
            notes.append(f"data source '{name}' is back: it continues where it was when it was removed")
        elif e["weight"] != p.sources[i].cfg.weight and old in saved:
            notes.append(f"data source '{name}': weight {e['weight']:g} -> {p.sources[i].cfg.weight:g}: the mix "
                         f"follows the new weights from step {state['step'] + 1}")
    taken = {old for kind, old in match if kind != "new"}
    p.retired = {k: e for k, e in pool.items() if k not in taken and k not in names}
    for k in p.retired:
        p.bad_total[k], p.excluded_total[k] = bad.get(k, 0), excl.get(k, 0)
        if k in saved:
            notes.append(f"data source '{k}' is no longer configured: the others continue; its position is kept "
                         f"(added again, it continues there)")
    sp.step, sp.language_steps = state["step"], state["language_steps"]
    _load_choosers(p, state, match)
    sp.mixed.load_state_dict(state["mixed"])
    notes += _settings(p, state, recut)
    dropped = _load_carry(p, state, match, recut)
    if dropped:
        notes.append(f"data: {dropped} sample(s) drawn for the next packed step are dropped (they no longer fit "
                     f"the changed data configuration)")
    p.exclude(p.skip_samples)
    return notes


def _match(p, pool: dict, current: set[str], names: list[str]) -> list[tuple[str, str | None]]:
    """Per configured source: (how it relates to the saved state, the saved name it continues from);
    ``current``: the names the checkpoint's configuration had (the rest of ``pool`` is retired)."""
    cids = p.content_ids
    out: list = [None] * len(names)
    taken = set()
    for i, name in enumerate(names):  # by name, same content
        e = pool.get(name)
        if e is not None and e["content"] == cids[i]:
            out[i] = ("same" if name in current else "readded", name)
            taken.add(name)
    for i, name in enumerate(names):  # by content under another name (renamed), else changed or new
        if out[i] is not None:
            continue
        old = next((k for k, e in pool.items() if k not in taken and k not in names and e["content"] == cids[i]),
                   None)
        if old is not None:
            out[i] = ("renamed", old)
            taken.add(old)
        elif name in pool:
            out[i] = ("changed", name)
            taken.add(name)
        else:
            out[i] = ("new", None)
    return out


def _load_choosers(p, state: dict, match: list) -> None:
    """Restore a modality's weighted-mix counts when it has the same sources (by name, after renames) with the same
    weights; else it restarts from zero with the new weights."""
    sp, saved = p.planner, state["sources"]
    for m, ch in sp.choosers.items():
        members = sp.by_modality[m]
        counts = state.get("choosers", {}).get(m, {})
        olds = [match[i][1] if match[i][0] in ("same", "renamed") else None for i in members]
        same = (None not in olds and set(olds) == set(counts)
                and all(saved[o]["weight"] == p.sources[i].cfg.weight and saved[o]["modality"] == m
                        for o, i in zip(olds, members)))
        ch.counts = [int(counts[o]) for o in olds] if same else [0] * len(members)


def _settings(p, state: dict, recut: list[str]) -> list[str]:
    d, t, notes, nxt = p.cfg.data, p.cfg.train, [], state["step"] + 1
    if state["seq_len"] != t.seq_len:
        line = (f"train.seq_len {state['seq_len']} -> {t.seq_len}: sources continue where they were; samples "
                f"longer than {t.seq_len} tokens are skipped (counted in skipped_samples)")
        if recut:
            line += (f"; indexed corpora ({', '.join(recut)}) are re-cut into chunks of {t.seq_len} tokens: each "
                     f"continues at the same share of its epoch, in the new chunks' order")
        notes.append(line)
    if state["packing"] != d.packing:
        notes.append(f"data.packing {str(state['packing']).lower()} -> {str(d.packing).lower()}: sources continue "
                     f"where they were; step {nxt} is the first {'packed' if d.packing else 'unpacked'} one")
    if state["group_by_modality"] != d.group_by_modality:
        mode = "all-language or all-multimodal" if d.group_by_modality else "mixed"
        notes.append(f"data.group_by_modality {str(state['group_by_modality']).lower()} -> "
                     f"{str(d.group_by_modality).lower()}: steps are {mode} from step {nxt}; sources continue where "
                     f"they were, the weighted mix restarts")
    if state["language_ratio"] != asdict(d.language_ratio):
        old = ", ".join(f"{k}: {v}" for k, v in state["language_ratio"].items())
        new = ", ".join(f"{k}: {v}" for k, v in asdict(d.language_ratio).items())
        notes.append(f"data.language_ratio {{{old}}} -> {{{new}}}: the new schedule applies from step {nxt} (a "
                     f"function of the global step: its warm-up counts from step 1)")
    return notes


def _load_carry(p, state: dict, match: list, recut: list[str]) -> int:
    """The packed samples waiting for their modality's next step, where they still can be used; returns how
    many are dropped."""
    where = {old: i for i, (kind, old) in enumerate(match) if kind in ("same", "renamed", "readded")}
    modes = ("mixed",) if not p.cfg.data.group_by_modality else ("text", "multimodal")
    p.carry, dropped = {}, 0
    for m, (name, index) in state.get("carry", {}).items():
        i = where.get(name)
        got = p.slot(i, index) if i is not None and p.sources[i].name not in recut else "gone"
        if p.cfg.data.packing and m in modes and not isinstance(got, str) and index not in p.excluded[i]:
            p.carry[m] = got
        else:
            dropped += 1
    return dropped


def _load_positional(p, state: dict) -> list[str]:
    """A state from before sources were known by name: the same sources, by position, as it was saved."""
    sp, saved = p.planner, state["planner"]
    _refuse_seed(saved["seed"], p.cfg.train.seed)
    if saved["sizes"] != sp.sizes:
        raise ConfigError(f"config error: data.sources: this checkpoint's data state is of an older kind that knows "
                          f"sources by position only ({len(saved['sizes'])} of sizes {saved['sizes']}), this "
                          f"configuration has {len(sp.sizes)} of sizes {sp.sizes}: resume with the data section and "
                          f"train.seq_len it was saved with")
    sp.load_state_dict(saved)
    sp.language_steps = state["language_steps"]
    p.bad_total.update(state.get("bad_total", {}))
    p.carry = {}
    for m, (source, index) in state.get("carry", {}).items():
        got = p.slot(source, index)
        if not isinstance(got, str):
            p.carry[m] = got
    p.exclude(p.skip_samples)
    return []
