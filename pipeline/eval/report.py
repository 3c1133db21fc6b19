"""The benchmark's outputs: its results table as Parquet, CSV and Markdown, and a bar chart of FID per model."""

from __future__ import annotations

import csv
import io
import logging
from typing import Any

import numpy as np

from pipeline import layout, storage
from pipeline.config import Config

log = logging.getLogger(__name__)

COLUMNS = ["model", "version", "category", "sketch_set", "n", "fid", "kid", "seconds", "evalset"]
HEADERS = {"model": "model", "version": "version", "category": "category", "sketch_set": "sketch set",
           "n": "N", "fid": "FID", "kid": "KID", "seconds": "seconds", "evalset": "evaluation set"}


def to_markdown(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in COLUMNS if c != "evalset"]

    def fmt(col, value):
        if col == "fid":
            return f"{value:.4f}"
        if col == "kid":
            return f"{value:.6f}"
        if col == "seconds":
            return f"{value:.1f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(HEADERS[c] for c in cols) + " |",
             "|" + "|".join("---:" if c in ("n", "fid", "kid", "seconds") else "---" for c in cols) + "|"]
    lines += ["| " + " | ".join(fmt(c, r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_parquet(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("model", pa.string()), ("version", pa.string()), ("category", pa.string()),
                        ("sketch_set", pa.string()), ("n", pa.int64()), ("fid", pa.float64()),
                        ("kid", pa.float64()), ("seconds", pa.float64()), ("evalset", pa.string())])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue()


def fid_chart(rows: list[dict[str, Any]], title: str) -> bytes:
    """A PNG bar chart: one bar per model, grouped and coloured by category."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.patches import Patch

    ordered = sorted(rows, key=lambda r: (r["category"], r["fid"]))
    categories = list(dict.fromkeys(r["category"] or "-" for r in ordered))
    palette = matplotlib.colormaps["tab10"]
    colour = {c: palette(i % 10) for i, c in enumerate(categories)}
    fig = Figure(figsize=(max(4.0, 0.9 * len(ordered) + 2), 4.0), dpi=100)
    ax = fig.add_subplot()
    xs = np.arange(len(ordered))
    bars = ax.bar(xs, [r["fid"] for r in ordered], color=[colour[r["category"] or "-"] for r in ordered])
    for bar, r in zip(bars, ordered):
        ax.annotate(f"{r['fid']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [r["model"] + (f" v{r['version']}" if r["version"] else "") for r in ordered],
                  rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title)
    handles = [Patch(color=colour[c], label=c) for c in categories]
    ax.legend(handles=handles, title="category", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def publish(cfg: Config, rows: list[dict[str, Any]]) -> dict[str, bytes]:
    """Publish the results table (Parquet, CSV, Markdown) and the FID chart as the benchmark's folder, whole;
    returns the files by name."""
    out = layout.benchmark_uri(cfg, cfg.eval.name)
    contents = {"parquet": to_parquet(rows), "csv": to_csv(rows).encode(), "markdown": to_markdown(rows).encode(),
                "chart": fid_chart(rows, f"FID per category: {cfg.eval.name}")}
    files = {layout.BENCHMARK_FILES[kind]: data for kind, data in contents.items()}
    with storage.staged_publish(out) as staging:
        for name, data in files.items():
            storage.write_bytes(storage.join(staging, name), data)
    log.info("benchmark: results published to %s", out)
    return files
