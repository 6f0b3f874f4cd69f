"""PNG plots of benchmark results (matplotlib, an optional dependency: pip install 'specdec[plot]').

- `plot_bench`: left, tokens/s per Spec-Bench category per method (grouped bars); right, when a verify-latency
  curve is given (the JSON of `python -m specdec.bench.verify_curve`), milliseconds to score k nodes per
  verifier variant. It returns the PNG's bytes; the caller saves them (`specdec.bench.report.write_new`).
The machine, threads and prompt count go in the title, as with every number this project prints.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from specdec.errors import SpecdecError


def plot_bench(report: dict, curve: dict | None = None) -> bytes:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SpecdecError("plotting needs matplotlib: pip install 'specdec[plot]'") from None
    table, info = report["table"], report["info"]
    methods = list(info["methods"])
    cats = [c for c in table if c != "overall"] + ["overall"]
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(16 if curve else 11, 5.5), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [c + (i - (len(methods) - 1) / 2) * width for c in range(len(cats))]
        ax.bar(xs, [table[c][m]["tokens_per_s"] for c in cats], width, label=m)
    ax.set_xticks(range(len(cats)), cats, rotation=45, ha="right")
    ax.set_ylabel("tokens/s (mean per prompt)")
    ax.set_title(f"Spec-Bench, {info['prompts']} prompts, {info['max_new_tokens']} new tokens, greedy, batch 1")
    ax.legend(fontsize=8)
    if curve:
        _plot_curve(axes[0][1], curve)
    fig.suptitle(f"{info['model']} {info['dtype']} | {info['cpu']} | {info['threads']} threads | torch {info['torch']}",
                 fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return png.getvalue()


def _plot_curve(ax, curve: dict) -> None:
    for variant, per_k in curve["results"].items():
        ks = sorted(int(k) for k in per_k)
        ax.plot(ks, [per_k[str(k)]["median_ms"] if str(k) in per_k else per_k[k]["median_ms"] for k in ks],
                marker="o", label=variant)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("nodes scored in one forward (k)")
    ax.set_ylabel("ms (median)")
    ax.set_title(f"verify latency over a {curve['info'].get('prefix', '?')}-token prefix")
    ax.legend(fontsize=8)


def load_json(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SpecdecError(f"{p} not found: give the JSON a bench or verify_curve run saved")
    return json.loads(p.read_text())
