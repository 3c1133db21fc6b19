"""Read, write, list and atomically publish data at a URI: a local path or ``s3://bucket/prefix``.

Reads and listings go through ``pyarrow.fs`` (which Ray Data and Parquet use too); S3 writes go through
boto3, whose single PUT or multipart upload makes an object visible only once it is complete (a failed
upload is aborted, never half-visible). Local writes go to a temporary name and are renamed into place.
An S3-compatible endpoint comes from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, as for boto3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import io
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.uris import StorageError, is_s3, join, local_path_of, scheme_of, split_s3  # noqa: F401 (re-exported)

log = logging.getLogger("sketchgan.storage")
_MAX_ATTEMPTS = int(os.environ.get("SKETCHGAN_S3_MAX_ATTEMPTS", "8"))


def endpoint_url() -> str | None:
    """The S3-compatible endpoint configured in the environment (None for AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str, pid: int) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "region": region,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_MAX_ATTEMPTS),
        "connect_timeout": 5,
        "request_timeout": 60,
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str, pid: int):
    import boto3
    from botocore.config import Config as BotoConfig

    # "standard" retry mode backs off exponentially with jitter on throttling and connection errors.
    cfg = BotoConfig(retries={"max_attempts": _MAX_ATTEMPTS, "mode": "standard"}, connect_timeout=5)
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=cfg)


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_client():
    """A boto3 S3 client for the configured endpoint (cached per process)."""
    return _s3_client(endpoint_url(), _region(), os.getpid())


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path for a URI (for Parquet and Ray Data)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _s3_filesystem(endpoint_url(), _region(), os.getpid()), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), str(local_path_of(uri).absolute())


def _wrap(uri: str, exc: Exception, action: str) -> StorageError:
    return StorageError(f"{action} {uri}: {exc}")


def exists(uri: str) -> bool:
    """Whether a file (object) or non-empty folder (prefix) exists at ``uri``."""
    if not is_s3(uri):
        return local_path_of(uri).exists()
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise _wrap(uri, exc, "cannot check") from exc


def read_bytes(uri: str) -> bytes:
    """The whole content of a file or object."""
    if not is_s3(uri):
        try:
            return local_path_of(uri).read_bytes()
        except OSError as exc:
            raise _wrap(uri, exc, "cannot read") from exc
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise StorageError(f"cannot read {uri}: no such object") from exc
    except OSError as exc:
        raise _wrap(uri, exc, "cannot read") from exc


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    raw = read_bytes(uri)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StorageError(f"cannot read {uri}: not valid JSON ({exc})") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old content or the whole new one, never a part."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().upload_fileobj(io.BytesIO(data), bucket, key)
        except Exception as exc:  # botocore raises many unrelated types
            raise _wrap(uri, exc, "cannot write") from exc
        return
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    _replace_local(uri, write)


def _replace_local(uri: str, write: Callable[[Path], None]) -> None:
    """Write a local file under a temporary name with ``write(tmp)``, then rename it into place."""
    dest = local_path_of(uri)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
        try:
            write(tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise _wrap(uri, exc, "cannot write") from exc


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))


def upload_file(local_path: str | Path, uri: str) -> None:
    """Publish a local file at ``uri`` atomically (rename locally; complete-or-nothing upload on S3)."""
    local_path = Path(local_path)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().upload_file(str(local_path), bucket, key)
        except Exception as exc:
            raise _wrap(uri, exc, "cannot upload to") from exc
        return
    _replace_local(uri, lambda tmp: shutil.copyfile(local_path, tmp))


def download_file(uri: str, local_path: str | Path) -> Path:
    """Copy a file or object to a local path and return it."""
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().download_file(bucket, key, str(local_path))
        except Exception as exc:
            raise _wrap(uri, exc, "cannot download") from exc
    else:
        try:
            shutil.copyfile(local_path_of(uri), local_path)
        except OSError as exc:
            raise _wrap(uri, exc, "cannot read") from exc
    return local_path


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path holding the file at ``uri`` (the file itself when local, a temporary copy for S3)."""
    if not is_s3(uri):
        path = local_path_of(uri)
        if not path.exists():
            raise StorageError(f"cannot read {uri}: no such file")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="sketchgan-") as tmp:
        yield download_file(uri, Path(tmp) / Path(split_s3(uri)[1]).name)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One file below a listed prefix: its URI, its path inside the filesystem, its path below the prefix, size."""

    uri: str
    path: str
    rel: str
    size: int


def list_entries(prefix: str, suffix: str | None = None) -> list[Entry]:
    """Every file below ``prefix`` (recursively; the file itself when ``prefix`` is one), sorted by path;
    hidden and temporary names (a part starting with ``.`` or ``_``) excluded. The one listing primitive."""
    fs, path = filesystem(prefix)
    try:
        top = fs.get_file_info(path)
        if top.type == pafs.FileType.File:
            infos, path = [top], path
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise _wrap(prefix, exc, "cannot list") from exc
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(path):].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/") if part):
            continue
        if suffix and not info.path.endswith(suffix):
            continue
        out.append(Entry(join(prefix, rel) if rel else prefix, info.path, rel, info.size or 0))
    return sorted(out, key=lambda e: e.path)


def list_files(prefix: str, suffix: str | None = None) -> list[str]:
    """URIs of all files below ``prefix`` (see `list_entries`), sorted."""
    return [e.uri for e in list_entries(prefix, suffix)]


def write_parquet(uri: str, table) -> None:
    """Write a pyarrow table as one Parquet file, atomically (see `write_bytes`)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(uri, buf.getvalue())


def read_parquet(uri: str, columns: list[str] | None = None, filter=None):
    """The Parquet file or folder at ``uri`` as one table; with a ``filter`` expression only matching rows are
    kept in memory (the scan streams), so picking a few rows out of a large dataset stays small."""
    import pyarrow.dataset as pads

    fs, path = filesystem(uri)
    dataset = pads.dataset(path, filesystem=fs, format="parquet", partitioning=None,
                           exclude_invalid_files=False, ignore_prefixes=[".", "_"])
    return dataset.to_table(columns=columns, filter=filter)


def delete(uri: str) -> None:
    """Delete one file or object if it exists."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise _wrap(uri, exc, "cannot delete") from exc
    else:
        local_path_of(uri).unlink(missing_ok=True)


def delete_prefix(uri: str) -> None:
    """Delete a folder or every object below a prefix."""
    if is_s3(uri):
        fs, path = filesystem(uri)
        try:
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                fs.delete_dir(path)
        except OSError as exc:
            raise _wrap(uri, exc, "cannot delete") from exc
    else:
        shutil.rmtree(local_path_of(uri), ignore_errors=True)


def _staging_name(out: str, kind: str) -> str:
    parent, _, name = out.rstrip("/").rpartition("/")
    return join(parent or ".", f".{name}.{kind}-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def _held_lock(staging: str) -> Iterator[None]:
    """An exclusive lock beside a local staging folder while it is in use: a process that dies (even by SIGKILL)
    releases it, which is how a later publish knows the folder was abandoned."""
    if is_s3(staging):
        yield
        return
    lock = local_path_of(staging).absolute().with_name(local_path_of(staging).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


def _remove_abandoned(out: str) -> None:
    """Delete the staging folders beside a local ``out`` whose process died (their lock is free)."""
    if is_s3(out):
        return
    dest = local_path_of(out).absolute()
    for lock in dest.parent.glob(f".{dest.name}.staging-*.lock"):
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live process holds it
            log.info("removing %s, left by an interrupted run", lock.with_suffix(""))
            shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
            lock.unlink(missing_ok=True)


def _swap_in(staging: str, out: str, marker: str | None) -> None:
    if not is_s3(out):
        # same filesystem: two renames, no copy of the (possibly large) data
        dest, old = local_path_of(out).absolute(), None
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex}")
            os.replace(dest, old)
        os.replace(local_path_of(staging).absolute(), dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    staged = {e.rel: e for e in list_entries(staging)}
    if marker:
        delete(join(out, marker))  # from here on readers see an incomplete folder, never a mixed one
    fs, _ = filesystem(out)
    try:
        for entry in list_entries(out):  # stale objects go before the marker makes the folder complete again
            if entry.rel not in staged:
                fs.delete_file(entry.path)
        for rel in sorted(staged, key=lambda r: r == marker):  # the marker last
            fs.copy_file(staged[rel].path, filesystem(join(out, rel))[1])
    except OSError as exc:
        raise _wrap(out, exc, "cannot publish") from exc


@contextlib.contextmanager
def staged_publish(out: str, marker: str | None = None) -> Iterator[str]:
    """Write a folder's new content under a hidden staging name beside ``out``, then make it visible whole.

    Yields the staging URI to write into. When the block ends normally the staged files replace ``out``: locally
    by renaming the staging folder into place (the old one moved aside first); on S3 by deleting ``marker`` (the
    file whose presence means "complete", e.g. a manifest) at ``out``, copying the staged objects with the marker
    last and removing stale ones. When the block raises, the staging is deleted and ``out`` is untouched. Local
    staging folders left by a killed process are recognised by their free lock and removed.
    """
    _remove_abandoned(out)
    staging = _staging_name(out, "staging")
    try:
        with _held_lock(staging):
            if not is_s3(staging):
                local_path_of(staging).mkdir(parents=True)  # an empty publish is an empty folder
            yield staging
            _swap_in(staging, out, marker)
    finally:
        delete_prefix(staging)


def publish_dir(local_dir: str | Path, uri: str, marker: str | None = None) -> None:
    """Publish a finished local folder at ``uri``, replacing what was there (see `staged_publish`)."""
    local_dir = Path(local_dir)
    with staged_publish(uri, marker) as staging:
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            upload_file(file, join(staging, file.relative_to(local_dir).as_posix()))


def ensure_writable(root: str) -> None:
    """Fail early, naming the root, if the storage root cannot be written."""
    probe = join(root, f".write-probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"ok")
        delete(probe)
    except (StorageError, OSError) as exc:
        raise StorageError(f"storage root {root} is not writable: {exc}") from exc
