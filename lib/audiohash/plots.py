"""Figures people would rather look at than read: one question per figure, axes labeled."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: executors, CI and notebooks write PNG files
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(curves: dict[str, dict], x: str, y: str, title: str, xlabel: str, ylabel: str, path: str | Path,
                logx: bool = False, marker: str | None = None) -> Path:
    """One line per method from curves[method][x], curves[method][y] (lists)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, curve in curves.items():
        ax.plot(curve[x], curve[y], label=name, linewidth=1.6, marker=marker)
    if logx:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_map_at_r(curves: dict[str, dict], path: str | Path, title: str = "mAP@R") -> Path:
    return plot_curves(curves, "r", "map_at_r", title, "R (results examined, log scale)", "mAP@R", path, logx=True)


def plot_precision_recall(curves: dict[str, dict], path: str | Path, title: str = "Precision-recall") -> Path:
    return plot_curves(curves, "recall_at_r", "precision_at_r", title, "recall", "precision", path)


def plot_metric_vs(rows: list[dict], x: str, y: str, path: str | Path, title: str, xlabel: str, ylabel: str,
                   logx: bool = False) -> Path:
    """rows: dicts with "method", x and y; one line per method, points sorted by x."""
    by_method: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: r[x]):
        line = by_method.setdefault(row["method"], {x: [], y: []})
        line[x].append(row[x])
        line[y].append(row[y])
    return plot_curves(by_method, x, y, title, xlabel, ylabel, path, logx=logx, marker="o")
