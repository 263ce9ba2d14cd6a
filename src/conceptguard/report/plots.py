"""Charts of evaluation and attack results, rendered with matplotlib's Agg backend to PNG bytes.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot), so nothing touches
global plotting state or needs a display, and each chart is one pure function of its data.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

# Colour-blind-safe palette (Okabe & Ito), one colour per model in every chart.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
DPI = 100
LEGEND_INSIDE = 6  # up to this many series a legend fits inside a bar chart


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    # Fixed metadata: the same data gives the same bytes (no creation date, no version string).
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def grouped_bars(title: str, categories: Sequence[str], series: Mapping[str, Sequence[float | None]], *,
                 ylabel: str = "", percent: bool = False, ylim: tuple[float, float] | None = None) -> bytes:
    """One group of bars per category, one bar (and colour) per series; ``None`` values are left out."""
    width = max(4.0, min(11.5, 1.2 + 0.3 * len(categories) * max(len(series), 1)))
    n = max(len(series), 1)
    # Many series: the legend goes below the axes in columns (inside, it would cover the bars).
    legend_rows = -(-n // 4) if n > LEGEND_INSIDE else 0
    figure = _figure(width, 3.2 + 0.2 * legend_rows)
    ax = figure.add_subplot()
    bar_width = 0.8 / n
    x = np.arange(len(categories))
    for k, (name, values) in enumerate(series.items()):
        heights = np.array([np.nan if v is None else (100 * v if percent else v) for v in values], dtype=float)
        ax.bar(x + (k - (n - 1) / 2) * bar_width, np.nan_to_num(heights), bar_width * 0.95, label=name,
               color=PALETTE[k % len(PALETTE)])
    ax.set_xticks(x, categories, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel + (" (%)" if percent else ""), fontsize=9)
    if ylim is not None:
        ax.set_ylim(*ylim)
    elif percent:
        ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    if legend_rows:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4)
    else:
        ax.legend(fontsize=8, loc="best")
    return _png(figure)


def metric_panels(title: str, panels: Mapping[str, Mapping[str, float | None]]) -> bytes:
    """Side-by-side single-metric bar charts (metrics on different scales: CLIP score, FID, LPIPS)."""
    figure = _figure(max(4.0, 2.4 * len(panels)), 2.8)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, values) in zip(axes, panels.items()):
        names = list(values)
        heights = [np.nan if values[n] is None else values[n] for n in names]
        ax.bar(range(len(names)), np.nan_to_num(np.array(heights, dtype=float)),
               color=[PALETTE[k % len(PALETTE)] for k in range(len(names))])
        ax.set_xticks(range(len(names)), names, fontsize=8, rotation=20, ha="right")
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle(title, fontsize=10)
    return _png(figure)


def recovery_curves(title: str, curves: Mapping[str, Sequence[tuple[float, float]]], *, ylabel: str = "detection",
                    percent: bool = True) -> bytes:
    """One line per attack: the erased concept's detection rate against attack steps."""
    figure = _figure(6.5, 3.4)
    ax = figure.add_subplot()
    for k, (name, points) in enumerate(curves.items()):
        steps = [p[0] for p in points]
        values = [100 * p[1] if percent else p[1] for p in points]
        # Past the palette's eight colours the line style changes, so every curve stays distinct.
        ax.plot(steps, values, marker="o", markersize=3, label=name, color=PALETTE[k % len(PALETTE)],
                linestyle=("-", "--", ":")[k // len(PALETTE) % 3])
    ax.set_xlabel("attack step", fontsize=9)
    ax.set_ylabel(ylabel + (" (%)" if percent else ""), fontsize=9)
    if percent:
        ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(figure)
