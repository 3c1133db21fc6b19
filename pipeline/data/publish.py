"""Publishing small multi-file sets (sketch sets, evaluation sets) whole, with ``manifest.json`` last."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

MANIFEST = "manifest.json"


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def publish_set(out: str, files: dict[str, bytes], manifest: dict) -> None:
    """Replace whatever is at ``out`` by ``files`` plus ``manifest.json``.

    Locally the finished folder is renamed into place (`storage.publish_dir`). On S3 the old manifest is
    removed first (readers then see an incomplete set, never a mixed one), the files are uploaded, stale
    objects removed, and the manifest written last.
    """
    if storage.is_s3(out):
        storage.delete(storage.join(out, MANIFEST))
        for name, data in files.items():
            storage.write_bytes(storage.join(out, name), data)
        for uri in storage.list_files(out):
            if uri[len(out):].lstrip("/") not in files and not uri.endswith("/" + MANIFEST):
                storage.delete(uri)
        storage.write_json(storage.join(out, MANIFEST), manifest)
        return
    with tempfile.TemporaryDirectory(prefix="sketchgan-set-") as tmp:
        for name, data in files.items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        storage.write_json(str(Path(tmp) / MANIFEST), manifest)
        storage.publish_dir(tmp, out)


def read_parquet_table(uri: str, columns: list[str] | None = None, filter=None) -> pa.Table:
    """The Parquet file or folder at ``uri``; with a ``filter`` expression only matching rows are kept in
    memory (the scan streams), so picking a few rows out of a large dataset stays small."""
    import pyarrow.dataset as pads

    fs, path = storage.filesystem(uri)
    dataset = pads.dataset(path, filesystem=fs, format="parquet", partitioning=None,
                           exclude_invalid_files=False, ignore_prefixes=[".", "_"])
    return dataset.to_table(columns=columns, filter=filter)
