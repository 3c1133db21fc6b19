"""The syntax of storage locations (a local path, ``file://`` or ``s3://bucket/key``): no I/O here."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

SUPPORTED_SCHEMES = ("", "file", "s3")


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
    """Whether ``uri`` names an S3 object or prefix."""
    return scheme_of(uri) == "s3"


def join(base: str, *parts: str) -> str:
    """Join path components onto a local path or URI with '/'."""
    out = base.rstrip("/") if base not in ("/",) else base
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}" if out else part
    return out


def local_path_of(uri: str) -> Path:
    """The local path of a plain path or ``file://`` URI."""
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket:
        raise StorageError(f"storage location {uri!r}: an s3:// URI needs a bucket name")
    return bucket, key
