"""The compute efficiency table: the fraction of the GPU's dense bf16 peak a pipeline part reaches, by GPU
family and matmul width (hidden size per TP rank), fitted to published runs by ``bench/fit_planner.py``.

The table lives in ONE file, ``fitted_efficiency.json`` next to this module, which also names the CSV rows
it was fitted on (``fit_rows``) and the ones it was not (``held_out_rows``); ``bench/plan_validation.py``
reports on the rows outside ``fit_rows``. Between the fitted widths the efficiency is interpolated linearly
in log2(width) and held constant beyond the ends; a family without fitted rows uses ``default``.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("fitted_efficiency.json")


@lru_cache(maxsize=4)
def load_table(path: str = str(TABLE_PATH)) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def efficiency(family: str, width: float, table: dict | None = None) -> float:
    """Fraction of peak for a matmul of ``width`` (hidden / tp) on a GPU of ``family``."""
    table = table if table is not None else load_table()
    row = table["families"].get(family)
    if not row or not row["widths"]:
        return float(table["default"])
    ws, es = row["widths"], row["efficiency"]
    x = math.log2(max(width, 1.0))
    xs = [math.log2(w) for w in ws]
    if x <= xs[0]:
        return es[0]
    if x >= xs[-1]:
        return es[-1]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            f = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return es[i - 1] + f * (es[i] - es[i - 1])
    return es[-1]  # pragma: no cover


def efficiency_fn(family: str, table: dict | None = None):
    """``efficiency`` for one family, as the cost model's ``eff(width)``."""
    table = table if table is not None else load_table()
    return lambda width: efficiency(family, width, table)
