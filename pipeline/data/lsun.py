"""Ray Data readers for the preprocess stage; each yields rows ``source_key`` (str) and ``data`` (encoded bytes).

- the official LSUN LMDB layout (a folder with ``data.mdb``; key = image id, value = encoded WebP/JPEG/PNG),
  read by `LmdbDatasource` in parallel contiguous key ranges. An LMDB cannot be memory-mapped from S3: for an
  ``s3://`` LMDB, ``data.mdb`` (and ``lock.mdb`` when present) is downloaded once per node to a local cache
  folder (``$TMPDIR/sketchgan-lmdb-<hash of URI, size and modification time>``) and read from there;
- a folder or S3 prefix of image files (``source_key`` = the path below the prefix);
- our own Parquet (a preprocessed dataset or any Parquet with an ``image`` column; ``source_key`` = ``id``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from pipeline import storage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ROWS_PER_BLOCK = 128  # ~13 MB of LSUN WebPs: blocks stay small whatever the split size
SPLIT_ROWS = 256  # the finest key range a read task can get


class SourceError(ValueError):
    """A data source that cannot be read; the message names it."""


def decode_key(key: bytes) -> str:
    """LMDB key bytes -> ``source_key`` (LSUN keys are ASCII; anything else is kept as ``hex:...``)."""
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return "hex:" + key.hex()


def is_lmdb(uri: str) -> bool:
    return storage.exists(storage.join(uri, "data.mdb"))


def local_lmdb(uri: str) -> str:
    """A local folder holding the LMDB at ``uri``: the folder itself, or for S3 a per-node cached download."""
    if not storage.is_s3(uri):
        return uri
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(storage.join(uri, "data.mdb"))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"LMDB {uri}: no data.mdb")
    tag = f"{uri}|{info.size}|{info.mtime_ns}"
    cache = Path(tempfile.gettempdir()) / f"sketchgan-lmdb-{hashlib.sha256(tag.encode()).hexdigest()[:16]}"
    if (cache / "data.mdb").exists():
        return str(cache)
    # Download into a private folder and rename it into place: concurrent read tasks on one node either see
    # the complete copy or make their own; the loser of the rename race discards its copy.
    tmp = cache.with_name(f"{cache.name}.tmp-{uuid.uuid4().hex}")
    try:
        storage.download_file(storage.join(uri, "data.mdb"), tmp / "data.mdb")
        if storage.exists(storage.join(uri, "lock.mdb")):
            storage.download_file(storage.join(uri, "lock.mdb"), tmp / "lock.mdb")
        try:
            os.rename(tmp, cache)
        except OSError:
            if not (cache / "data.mdb").exists():
                raise
    finally:
        if tmp.exists():
            storage.delete_prefix(str(tmp))
    return str(cache)


def _open_lmdb(path: str):
    import lmdb

    try:
        return lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=512)
    except lmdb.Error as exc:
        raise SourceError(f"LMDB {path}: cannot open ({exc})") from None


def _table(keys: list[str], values: list[bytes]) -> pa.Table:
    return pa.table({"source_key": pa.array(keys, pa.string()), "data": pa.array(values, pa.binary())})


def read_lmdb_range(uri: str, first: bytes, count: int) -> Iterator[pa.Table]:
    """``count`` records from key ``first`` on, in blocks of `ROWS_PER_BLOCK`."""
    env = _open_lmdb(local_lmdb(uri))
    try:
        with env.begin(buffers=False) as txn:
            cur = txn.cursor()
            if not cur.set_range(first):
                return
            keys: list[str] = []
            values: list[bytes] = []
            for n, (key, value) in enumerate(cur, start=1):
                keys.append(decode_key(key))
                values.append(value)
                if len(keys) == ROWS_PER_BLOCK:
                    yield _table(keys, values)
                    keys, values = [], []
                if n == count:
                    break
            if keys:
                yield _table(keys, values)
    finally:
        env.close()


def lmdb_splits(uri: str, limit: int | None = None) -> tuple[list[tuple[bytes, int]], str]:
    """One pass over the keys (not the values): contiguous ranges of at most `SPLIT_ROWS` records as
    (first key, count), and a fingerprint of the keys read and the file size. Only every `SPLIT_ROWS`-th
    key is kept, so LSUN's 1.6 M keys cost little memory."""
    path = local_lmdb(uri)
    h = hashlib.sha256()
    h.update(str((Path(path) / "data.mdb").stat().st_size).encode())
    splits: list[tuple[bytes, int]] = []
    env = _open_lmdb(path)
    try:
        with env.begin() as txn:
            n = 0
            for key in txn.cursor().iternext(keys=True, values=False):
                if limit is not None and n >= limit:
                    break
                key = bytes(key)
                h.update(len(key).to_bytes(4, "little") + key)
                if n % SPLIT_ROWS == 0:
                    splits.append((key, 0))
                first, count = splits[-1]
                splits[-1] = (first, count + 1)
                n += 1
    finally:
        env.close()
    return splits, h.hexdigest()


def lmdb_datasource(uri: str, limit: int | None = None):
    """The Ray `Datasource` over one LMDB (the class is built lazily: importing this module needs no Ray)."""
    return _lmdb_datasource_class()(uri, limit)


def _lmdb_datasource_class():
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class _LmdbDatasource(Datasource):
        """An LSUN LMDB as a Ray datasource: one read task per run of contiguous key ranges."""

        def __init__(self, uri: str, limit: int | None = None):
            super().__init__()
            self.uri = uri
            self.splits, self.fingerprint = lmdb_splits(uri, limit)
            self.num_rows = sum(c for _, c in self.splits)
            if not self.num_rows:
                raise SourceError(f"LMDB {uri} holds no records")
            self._bytes = (Path(local_lmdb(uri)) / "data.mdb").stat().st_size

        def get_name(self) -> str:
            return "LSUN-LMDB"

        def estimate_inmemory_data_size(self) -> int | None:
            return self._bytes

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context=None) -> list[ReadTask]:
            groups = max(1, min(parallelism, len(self.splits)))
            bounds = [round(i * len(self.splits) / groups) for i in range(groups + 1)]
            uri, tasks = self.uri, []
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                first, count = self.splits[lo][0], sum(c for _, c in self.splits[lo:hi])
                meta = BlockMetadata(num_rows=count, size_bytes=self._bytes * count // self.num_rows,
                                     input_files=None, exec_stats=None)
                tasks.append(ReadTask(lambda f=first, c=count: read_lmdb_range(uri, f, c), meta,
                                      per_task_row_limit=per_task_row_limit))
            return tasks

    return _LmdbDatasource


def _image_files(uri: str) -> list[storage.Entry]:
    return [e for e in storage.list_entries(uri) if e.rel.lower().endswith(IMAGE_SUFFIXES)]


def _fingerprint(entries: list[storage.Entry], base: str) -> str:
    h = hashlib.sha256()
    for entry in entries:
        h.update(f"{entry.path[len(base):]}|{entry.size}\n".encode())
    return h.hexdigest()


def read_image_files(uri: str, limit: int | None = None):
    """(Ray dataset, fingerprint) over every image file below a folder or S3 prefix, in path order."""
    import ray.data

    fs, base = storage.filesystem(uri)
    infos = _image_files(uri)[:limit] if limit else _image_files(uri)
    if not infos:
        raise SourceError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) below {uri}")
    prefix = base.rstrip("/") + "/"

    def rename(batch: pa.Table) -> pa.Table:
        keys = [p[len(prefix):] if p.startswith(prefix) else p for p in batch.column("path").to_pylist()]
        return pa.table({"source_key": pa.array(keys, pa.string()), "data": batch.column("bytes")})

    ds = ray.data.read_binary_files([i.path for i in infos], filesystem=fs, include_paths=True)
    return ds.map_batches(rename, batch_format="pyarrow"), _fingerprint(infos, base)


def read_parquet_images(uri: str, limit: int | None = None):
    """(Ray dataset, fingerprint) over our own Parquet: the ``image`` column, ``source_key`` from ``id``."""
    import ray.data

    fs, base = storage.filesystem(uri)
    infos = storage.list_entries(uri, suffix=".parquet")
    if not infos:
        raise SourceError(f"no Parquet files at {uri}")
    paths = sorted(i.path for i in infos)
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["id", "image"], partitioning=None)
    if limit:
        ds = ds.limit(limit)
    ds = ds.map_batches(lambda b: pa.table({"source_key": b.column("id"), "data": b.column("image")}),
                        batch_format="pyarrow")
    return ds, _fingerprint(infos, base) + f"|limit={limit}"


def read_source(uri: str, limit: int | None = None):
    """(Ray dataset of ``source_key``/``data``, input fingerprint) for what is at ``uri``: an LMDB folder,
    Parquet file(s), or a folder/prefix of image files."""
    import ray.data

    if is_lmdb(uri):
        source = lmdb_datasource(uri, limit)
        return ray.data.read_datasource(source), source.fingerprint
    if not storage.exists(uri):
        raise SourceError(f"data source {uri} does not exist")
    if uri.endswith(".parquet") or storage.list_files(uri, suffix=".parquet"):
        return read_parquet_images(uri, limit)
    return read_image_files(uri, limit)
