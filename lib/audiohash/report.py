"""The comparison report, pure half: settings, the paper-layout table, and the figures.

The Spark half is jobs/report.py, which runs extract, train, encode and query (the real jobs)
for every method and bit width and hands their MLflow metrics to the functions here.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from audiohash.plots import plot_map_at_r, plot_metric_vs, plot_precision_recall

BITS = (8, 16, 24, 32, 64)
METHODS = ("sh", "itq", "agh", "pq", "opq", "dqn", "dqn_cls", "dqn_semi")
LABEL_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
SUPERVISED = ("dqn", "dqn_cls", "dqn_semi")


def hard_manifest(manifest: pd.DataFrame, train_bank: str, held_out_bank: str) -> pd.DataFrame:
    """The cross-bank setting: train on ``train_bank``'s database clips (split "train"), index
    ``held_out_bank``'s database clips (split "db"), query with ``train_bank``'s query clips.
    The sound source changes between queries and database; the labels do not."""
    bank = manifest["soundfont"]
    train = manifest[(bank == train_bank) & (manifest["split"] == "db")].assign(split="train")
    database = manifest[(bank == held_out_bank) & (manifest["split"] == "db")]
    queries = manifest[(bank == train_bank) & (manifest["split"] == "query")]
    return pd.concat([train, database, queries], ignore_index=True)


def paper_table(rows: list[dict], metric: str = "map_all") -> str:
    """Markdown table in the paper's layout: one row per method, one column per bit width."""
    frame = pd.DataFrame(rows)
    pivot = frame.pivot_table(index="method", columns="bits", values=metric, aggfunc="first")
    order = [m for m in (*METHODS, *sorted(set(pivot.index) - set(METHODS))) if m in pivot.index]
    pivot = pivot.loc[order]
    header = "| method | " + " | ".join(f"{b} bits" for b in pivot.columns) + " |"
    lines = [header, "|---|" + "---:|" * len(pivot.columns)]
    for method, values in pivot.iterrows():
        cells = ["" if pd.isna(v) else f"{100 * v:.1f}" for v in values]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(folder: str | Path, setting: str, rows: list[dict], curves: dict[str, dict],
                 sweep: list[dict], curve_bits: int) -> Path:
    """reports/<setting>/: results.md (tables), results.json (every number), and the PNG figures."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"setting": setting, "results": rows, "label_sweep": sweep,
                                                     "curves": curves}, indent=1))
    parts = [f"# audiohash comparison: {setting} setting", "",
             "mAP over the whole database (mAP@all, %) by method and code length:", "", paper_table(rows), "",
             "mAP@100 (%):", "", paper_table(rows, "map_at_100"), ""]
    if any("map_all_unseen" in r for r in rows):  # the unseen setting: classes without labels in training
        parts += ["mAP@all (%) of the queries whose class had no label in training:", "",
                  paper_table([r for r in rows if "map_all_unseen" in r], "map_all_unseen"), "",
                  "mAP@all (%) of the queries whose class had labels:", "",
                  paper_table([r for r in rows if "map_all_seen" in r], "map_all_seen"), ""]
    plot_metric_vs(rows, "bits", "map_all", folder / "map_vs_bits.png", f"mAP@all vs code length ({setting})",
                   "bits per clip", "mAP@all")
    if curves:
        plot_map_at_r(curves, folder / "map_at_r.png", f"mAP@R at {curve_bits} bits ({setting})")
        plot_precision_recall(curves, folder / "precision_recall.png", f"Precision-recall at {curve_bits} bits ({setting})")
    if sweep:
        plot_metric_vs(sweep, "label_fraction", "map_all", folder / "label_fraction.png",
                       f"mAP@all vs labeled fraction, {curve_bits} bits ({setting})", "labeled fraction (log scale)",
                       "mAP@all", logx=True)
        parts += ["mAP@all (%) vs labeled fraction:", "",
                  paper_table([{**r, "bits": r["label_fraction"]} for r in sweep]).replace(" bits |", " |"), ""]
    (folder / "results.md").write_text("\n".join(parts))
    return folder
