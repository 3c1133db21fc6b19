"""Read, write, list and atomically publish data at a URI: a local path or ``s3://bucket/prefix``.

Reads and listings go through ``pyarrow.fs`` (which Ray Data and Parquet use too); S3 writes go through
boto3, whose single PUT or multipart upload makes an object visible only once it is complete (a failed
upload is aborted, never half-visible). Local writes go to a temporary name and are renamed into place.
An S3-compatible endpoint comes from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, as for boto3.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

SUPPORTED_SCHEMES = ("", "file", "s3")
_MAX_ATTEMPTS = int(os.environ.get("SKETCHGAN_S3_MAX_ATTEMPTS", "8"))


class StorageError(OSError):
    """A storage location that cannot be used; the message names the URI."""


def scheme_of(uri: str) -> str:
    """The URI's scheme ('' for a plain local path); refuses schemes we cannot read or write."""
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"storage location {uri!r}: expected a local path or an s3:// URI")
    if len(uri) > 1 and uri[1] == ":" and uri[0].isalpha():  # a Windows drive letter, not a scheme
        return ""
    scheme = urlparse(uri).scheme.lower() if "://" in uri else ""
    if scheme not in SUPPORTED_SCHEMES:
        raise StorageError(
            f"storage location {uri!r}: unsupported scheme {scheme + '://'!r} (use a local path or s3://)"
        )
    return scheme


def is_s3(uri: str) -> bool:
    return scheme_of(uri) == "s3"


def join(base: str, *parts: str) -> str:
    """Join path components onto a local path or URI with '/'."""
    out = base.rstrip("/") if base not in ("/",) else base
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}" if out else part
    return out


def _local_path(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket:
        raise StorageError(f"storage location {uri!r}: an s3:// URI needs a bucket name")
    return bucket, key


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
        bucket, key = _split_s3(uri)
        return _s3_filesystem(endpoint_url(), _region(), os.getpid()), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), str(_local_path(uri).absolute())


def _wrap(uri: str, exc: Exception, action: str) -> StorageError:
    return StorageError(f"{action} {uri}: {exc}")


def exists(uri: str) -> bool:
    """Whether a file (object) or non-empty folder (prefix) exists at ``uri``."""
    if not is_s3(uri):
        return _local_path(uri).exists()
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise _wrap(uri, exc, "cannot check") from exc


def read_bytes(uri: str) -> bytes:
    """The whole content of a file or object."""
    if not is_s3(uri):
        try:
            return _local_path(uri).read_bytes()
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
        bucket, key = _split_s3(uri)
        try:
            s3_client().upload_fileobj(io.BytesIO(data), bucket, key)
        except Exception as exc:  # botocore raises many unrelated types
            raise _wrap(uri, exc, "cannot write") from exc
        return
    path = _local_path(uri)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
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
        bucket, key = _split_s3(uri)
        try:
            s3_client().upload_file(str(local_path), bucket, key)
        except Exception as exc:
            raise _wrap(uri, exc, "cannot upload to") from exc
        return
    dest = _local_path(uri)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
        try:
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise _wrap(uri, exc, "cannot write") from exc


def download_file(uri: str, local_path: str | Path) -> Path:
    """Copy a file or object to a local path and return it."""
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        try:
            s3_client().download_file(bucket, key, str(local_path))
        except Exception as exc:
            raise _wrap(uri, exc, "cannot download") from exc
    else:
        try:
            shutil.copyfile(_local_path(uri), local_path)
        except OSError as exc:
            raise _wrap(uri, exc, "cannot read") from exc
    return local_path


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path holding the file at ``uri`` (the file itself when local, a temporary copy for S3)."""
    if not is_s3(uri):
        path = _local_path(uri)
        if not path.exists():
            raise StorageError(f"cannot read {uri}: no such file")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="sketchgan-") as tmp:
        yield download_file(uri, Path(tmp) / Path(_split_s3(uri)[1]).name)


def list_files(prefix: str, suffix: str | None = None) -> list[str]:
    """URIs of all files below ``prefix`` (recursively), sorted; hidden and temporary names excluded."""
    fs, path = filesystem(prefix)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise _wrap(prefix, exc, "cannot list") from exc
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(path):].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if suffix and not rel.endswith(suffix):
            continue
        out.append(join(prefix, rel))
    return sorted(out)


def delete(uri: str) -> None:
    """Delete one file or object if it exists."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        try:
            s3_client().delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise _wrap(uri, exc, "cannot delete") from exc
    else:
        _local_path(uri).unlink(missing_ok=True)


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
        shutil.rmtree(_local_path(uri), ignore_errors=True)


def publish_dir(local_dir: str | Path, uri: str) -> None:
    """Publish a finished local folder at ``uri``, replacing what was there.

    Locally the folder is renamed into place in one step (the old one moved aside first). On S3 every
    object is uploaded (each atomically) and stale objects that the new folder no longer has are removed;
    callers make a multi-object set visible by writing its manifest last (see ``write_json``).
    """
    local_dir = Path(local_dir)
    if is_s3(uri):
        new_keys = set()
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = file.relative_to(local_dir).as_posix()
            new_keys.add(rel)
            upload_file(file, join(uri, rel))
        fs, path = filesystem(uri)
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
            rel = info.path[len(path):].lstrip("/")
            if info.type == pafs.FileType.File and rel not in new_keys:
                fs.delete_file(info.path)
        return
    dest = _local_path(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = dest.with_name(f".{dest.name}.staging-{uuid.uuid4().hex}")
    shutil.copytree(local_dir, staged)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex}")
        os.replace(dest, old)
    os.replace(staged, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_writable(root: str) -> None:
    """Fail early, naming the root, if the storage root cannot be written."""
    probe = join(root, f".write-probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"ok")
        delete(probe)
    except (StorageError, OSError) as exc:
        raise StorageError(f"storage root {root} is not writable: {exc}") from exc
