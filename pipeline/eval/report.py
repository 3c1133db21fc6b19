"""The benchmark's outputs: its results table as Parquet, CSV, Markdown and JSON, and a bar chart of FID per model,
grouped by evaluation set with the baseline (the base model) beside the models customised for that set."""

from __future__ import annotations

import csv
import io
import json
import logging
from typing import Any

from pipeline import layout, storage
from pipeline.config import Config

log = logging.getLogger(__name__)

COLUMNS = ["model", "version", "category", "sketch_set", "n", "fid", "kid", "seconds", "evalset"]
# precision and recall (absent from rows made before them); fid_base and baseline with a baseline
# (eval.baseline); target_share with a classifier (eval.classifier);
# sketch_fidelity(_base) with a known sketch set; ppl (and the distance it used) unless eval.ppl_samples is 0
OPTIONAL = ["precision", "recall", "fid_base", "target_share", "sketch_fidelity", "sketch_fidelity_base", "ppl",
            "ppl_distance", "baseline"]
HEADERS = {"model": "model", "version": "version", "category": "category", "sketch_set": "sketch set",
           "n": "N", "fid": "FID", "kid": "KID ×10³", "precision": "precision", "recall": "recall",
           "seconds": "seconds", "evalset": "evaluation set", "fid_base": "FID of the base",
           "target_share": "target share", "sketch_fidelity": "sketch distance",
           "sketch_fidelity_base": "sketch distance of the base", "ppl": "PPL", "ppl_distance": "PPL distance",
           "baseline": "baseline"}
NUMERIC = ("n", "fid", "kid", "precision", "recall", "seconds", "fid_base", "target_share", "sketch_fidelity",
           "sketch_fidelity_base", "ppl")


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return COLUMNS + [c for c in OPTIONAL if any(c in r for r in rows)]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in _columns(rows) if c not in ("evalset", "baseline")]

    def fmt(col, value):
        if value is None:
            return ""
        if col in ("fid", "fid_base"):
            return f"{value:.4f}"
        if col == "kid":  # reported x 1000, as papers do (the JSON, CSV and Parquet keep the raw value)
            return f"{value * 1000:.3f}"
        if col in ("target_share", "precision", "recall", "sketch_fidelity", "sketch_fidelity_base"):
            return f"{value:.3f}"
        if col == "ppl":
            return f"{value:.4g}"
        if col == "seconds":
            return f"{value:.1f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(HEADERS[c] for c in cols) + " |",
             "|" + "|".join("---:" if c in NUMERIC else "---" for c in cols) + "|"]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_json(rows: list[dict[str, Any]]) -> str:
    """The rows as a JSON list (every column; optional ones null where not measured)."""
    keys = COLUMNS + OPTIONAL
    return json.dumps([{k: r.get(k) for k in keys} for r in rows], indent=1) + "\n"


def to_parquet(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("model", pa.string()), ("version", pa.string()), ("category", pa.string()),
                        ("sketch_set", pa.string()), ("n", pa.int64()), ("fid", pa.float64()),
                        ("kid", pa.float64()), ("seconds", pa.float64()), ("evalset", pa.string()),
                        ("precision", pa.float64()), ("recall", pa.float64()), ("fid_base", pa.float64()),
                        ("target_share", pa.float64()), ("sketch_fidelity", pa.float64()),
                        ("sketch_fidelity_base", pa.float64()), ("ppl", pa.float64()), ("ppl_distance", pa.string()),
                        ("baseline", pa.bool_())])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue()


def fid_chart(rows: list[dict[str, Any]], title: str) -> bytes:
    """A PNG bar chart of FID: one group of bars per evaluation set (its FIDs are comparable with each other,
    not with another set's), the baseline first in grey, then the models scored on that set."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.patches import Patch

    groups = list(dict.fromkeys(r["evalset"] for r in rows))
    palette = matplotlib.colormaps["tab10"]
    xs, heights, colours, labels, spans = [], [], [], [], []
    x = 0.0
    for g, evalset in enumerate(groups):
        members = sorted((r for r in rows if r["evalset"] == evalset),
                         key=lambda r: (not r.get("baseline"), r["fid"]))
        start = x
        for r in members:
            xs.append(x)
            heights.append(r["fid"])
            colours.append("0.6" if r.get("baseline") else palette(g % 10))
            labels.append(r["model"] + (f" v{r['version']}" if r["version"] else ""))
            x += 1
        spans.append((start, x - 1, members[0]["sketch_set"] or evalset.rstrip("/").rsplit("/", 1)[-1]))
        x += 0.6  # a gap between evaluation sets
    fig = Figure(figsize=(max(4.0, 0.9 * len(xs) + 2), 4.4), dpi=100)
    ax = fig.add_subplot()
    bars = ax.bar(xs, heights, color=colours)
    for bar, h in zip(bars, heights):
        ax.annotate(f"{h:.2f}", (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
    for lo, hi, name in spans:
        ax.annotate(f"evaluation set: {name}", ((lo + hi) / 2, 1.0), xycoords=("data", "axes fraction"),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title, pad=16)
    if any(r.get("baseline") for r in rows):
        # outside the axes: inside it would hide a small bar's label
        ax.legend(handles=[Patch(color="0.6", label="base (baseline)")], fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def publish(cfg: Config, rows: list[dict[str, Any]], compare_png: bytes | None = None) -> dict[str, bytes]:
    """Publish the results table (Parquet, CSV, Markdown, JSON), the FID chart and, when given, the comparison
    figure as the benchmark's folder, whole; returns the files by name."""
    out = layout.benchmark_uri(cfg, cfg.eval.name)
    contents = {"parquet": to_parquet(rows), "csv": to_csv(rows).encode(), "markdown": to_markdown(rows).encode(),
                "json": to_json(rows).encode(), "chart": fid_chart(rows, f"FID per evaluation set: {cfg.eval.name}")}
    if compare_png is not None:
        contents["compare"] = compare_png
    files = {layout.BENCHMARK_FILES[kind]: data for kind, data in contents.items()}
    with storage.staged_publish(out) as staging:
        for name, data in files.items():
            storage.write_bytes(storage.join(staging, name), data)
    log.info("benchmark: results published to %s", out)
    return files
