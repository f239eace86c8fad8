"""``vlpretrain report``: figures from metrics.jsonl / eval.jsonl of several runs, fast on long runs, an offline
page whose every figure loads in a real browser (headless Chromium, skipped where it is missing)."""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

pytest.importorskip("matplotlib")

from vlpretrain.errors import UserError  # noqa: E402
from vlpretrain.report import write_report  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def write_synthetic_run(run: Path, steps: int, seed: int = 0, evals: bool = True) -> None:
    """A metrics.jsonl shaped as the trainer writes it (grouped steps, language share 1.0 -> 0.7, per-source
    counts, a few bad samples), plus an eval.jsonl every steps/10."""
    rng = random.Random(seed)
    run.mkdir(parents=True, exist_ok=True)
    lang, lines = 0, []
    for s in range(1, steps + 1):
        target = 1.0 - 0.3 * min(1.0, s / (steps / 2))
        text = lang / s < target  # error diffusion, as the planner does
        lang += text
        counts = {"corpus": 16} if text else {"captions": 8, "interleaved": 5, "ocr": 3}
        lines.append(json.dumps({
            "step": s, "loss": 6 * math.exp(-s / (steps / 5)) + 1.5 + 0.3 * (not text) + rng.gauss(0, 0.1),
            "modality": "text" if text else "multimodal",
            "lr": 1e-3 * min(1.0, s / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)), "grad_norm": 1 + rng.random(),
            "tokens": 4096, "tokens_per_s": 5e4 + rng.gauss(0, 2e3), "step_time_s": 0.08,
            "mfu": 0.4 + rng.gauss(0, 0.01), "model_tflops": 400.0, "consumed_samples": 16 * s,
            "images": 0 if text else 16, "language_ratio_target": target, "language_ratio_realized": lang / s,
            "samples_digest": f"{rng.getrandbits(64):016x}", "source_counts": counts,
            "bad_samples": {"ocr": 1} if rng.random() < 0.01 else {}, "bad_images": int(rng.random() < 0.005),
            "skipped_samples": 0, "rank_cost_imbalance": 1.0 if text else 1 + rng.random() * 0.02,
            "rank_cost_imbalance_contiguous": 1.0 if text else 1.05 + rng.random() * 0.1}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if evals:
        with open(run / "eval.jsonl", "w") as f:
            for s in range(0, steps + 1, max(1, steps // 10)):
                f.write(json.dumps({"step": s, "mcppl_accuracy": 0.25 + 0.5 * s / steps,
                                    "mcppl_by_type": {"colour": 0.3 + 0.6 * s / steps, "shape": 0.25 + 0.4 * s / steps},
                                    "text_bpb": 3 - s / steps, "text_ppl": 20 - 10 * s / steps}) + "\n")


@pytest.fixture(scope="module")
def long_report(tmp_path_factory):
    """Two 10k-step runs (one without eval.jsonl) reported together; the time is printed, not asserted."""
    root = tmp_path_factory.mktemp("report")
    write_synthetic_run(root / "grouped", 10_000, seed=0)
    write_synthetic_run(root / "mixed", 10_000, seed=1, evals=False)
    t0 = time.perf_counter()
    result = write_report([root / "grouped", root / "mixed"], root / "out")
    took = time.perf_counter() - t0
    print(f"\nreport of two 10k-step runs: {took:.2f} s (loading {result['load_s']:.2f} s)")
    return root / "out", result


def test_report_of_two_long_runs(long_report):
    out, result = long_report
    assert result["runs"] == ["grouped", "mixed"] and result["steps"] == [10_000, 10_000]
    stems = {"loss", "lr", "language_share", "throughput", "eval", "sources", "bad_data", "balance"}
    assert {f[:-4] for f in result["figures"]} == stems
    page = (out / "index.html").read_text()
    for f in result["figures"]:
        assert (out / f).stat().st_size > 10_000, f  # a drawn figure, not an empty canvas
        assert f'src="{f}"' in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing from the network
    assert re.search(r"<td>1\.0\d\d / 1\.0\d\d</td>", page)  # the mean predicted imbalance, placed / contiguous


def test_report_reads_damaged_and_partial_runs(tmp_path):
    run = tmp_path / "run"
    write_synthetic_run(run, 30, evals=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "loss": 2.')  # cut by a crash
    (run / "summary.json").write_text(json.dumps({"steps": 30, "eval": {"accuracy": 0.5}}))
    result = write_report([run, run], tmp_path / "out")  # the same run twice: both drawn, distinct names
    assert result["steps"] == [30, 30] and result["runs"] == ["run", "run (2)"]
    assert "eval.png" in result["figures"]  # the final evaluation of summary.json
    (run / "summary.json").unlink()
    assert "eval.png" not in write_report([run], tmp_path / "out2")["figures"]


def test_report_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        write_report([tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl"):
        write_report([tmp_path / "empty"], tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "vlpretrain", "report", str(tmp_path / "empty"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _chromium() -> str | None:
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):  # once, bounded
        subprocess.run(["bash", str(REPO / "launch" / "setup_browser.sh")], timeout=900, capture_output=True)
        found = shutil.which("chromium")
    return found


def _loaded_widths(chromium: str, page: Path, tmp: Path) -> dict[str, int]:
    """Open ``page`` in headless Chromium with a script that writes each image's naturalWidth (0: not
    loaded) into the DOM, and read them back from the dumped DOM."""
    script = ("<script>window.addEventListener('load', function () { var pre = document.createElement('pre');"
              "pre.id = 'vlp-check'; pre.textContent = Array.prototype.map.call(document.images, function (im) {"
              " return im.getAttribute('src') + '=' + im.naturalWidth; }).join(';');"
              " document.body.appendChild(pre); });</script>")
    check = page.with_name("_check.html")  # beside the page: the same relative figure paths
    check.write_text(page.read_text().replace("</body>", script + "</body>"))
    try:
        proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               "--no-first-run", f"--user-data-dir={tmp}", "--virtual-time-budget=10000",
                               "--dump-dom", check.as_uri()], capture_output=True, text=True, timeout=120)
    finally:
        check.unlink()
    m = re.search(r'<pre id="vlp-check">([^<]*)</pre>', proc.stdout)
    assert m, f"no result in the dumped DOM; chromium said: {proc.stderr[-2000:]}"
    return {k: int(v) for k, v in (item.rsplit("=", 1) for item in m.group(1).split(";") if item)}


def test_every_figure_loads_in_chromium(long_report, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("headless Chromium not installed (Debian package 'chromium'; launch/setup_browser.sh)")
    out, result = long_report
    widths = _loaded_widths(chromium, out / "index.html", tmp_path / "profile")
    assert sorted(widths) == sorted(result["figures"])
    assert all(w > 0 for w in widths.values()), widths
    # the check can fail: a figure that is missing reads as width 0
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "lr.png").unlink()
    widths = _loaded_widths(chromium, broken / "index.html", tmp_path / "profile2")
    assert widths["lr.png"] == 0 and widths["loss.png"] > 0


def test_language_share_drawn_only_for_runs_that_schedule_it(tmp_path):
    """A mixed-modality run (stage 1 or 3: no language:multimodal schedule, target logged as null) gets no
    target line; a report of such runs alone has no language-share figure."""
    from vlpretrain.report.data import load_run
    from vlpretrain.report.figures import fig_language_share

    grouped, mixed = tmp_path / "stage2", tmp_path / "stage3"
    write_synthetic_run(grouped, 50, evals=False)
    write_synthetic_run(mixed, 50, evals=False)
    lines = [json.loads(x) for x in (mixed / "metrics.jsonl").read_text().splitlines()]
    (mixed / "metrics.jsonl").write_text("".join(json.dumps({**r, "language_ratio_target": None}) + "\n"
                                                 for r in lines))
    assert fig_language_share([load_run(mixed)]) is None
    fig = fig_language_share([load_run(grouped), load_run(mixed)])
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert any(lbl.startswith("stage2 target") for lbl in labels)
    assert not any(lbl.startswith("stage3") for lbl in labels), labels
