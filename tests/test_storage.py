import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.storage import StorageError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/prefix"


def test_round_trip_and_listing(root):
    a, b = storage.join(root, "x", "a.bin"), storage.join(root, "x", "sub", "b.json")
    assert not storage.exists(a)
    storage.write_bytes(a, b"\x00\x01payload")
    storage.write_json(b, {"k": [1, 2]})
    assert storage.exists(a) and storage.read_bytes(a) == b"\x00\x01payload"
    assert storage.read_json(b) == {"k": [1, 2]}
    assert storage.list_files(storage.join(root, "x")) == [a, b]
    assert storage.list_files(storage.join(root, "x"), suffix=".json") == [b]
    storage.delete(a)
    assert not storage.exists(a)
    storage.delete_prefix(storage.join(root, "x"))
    assert storage.list_files(storage.join(root, "x")) == []


def test_missing_file_error_names_uri(root):
    uri = storage.join(root, "missing.bin")
    with pytest.raises(StorageError, match="missing.bin"):
        storage.read_bytes(uri)


def test_overwrite_is_all_or_nothing(root):
    uri = storage.join(root, "obj.bin")
    storage.write_bytes(uri, b"old")
    storage.write_bytes(uri, b"new" * 1000)
    assert storage.read_bytes(uri) == b"new" * 1000
    # no temporary names are left behind where readers list
    assert storage.list_files(root) == [uri]


@pytest.mark.reliability
def test_failed_local_write_leaves_old_content(tmp_path, monkeypatch):
    uri = str(tmp_path / "f.bin")
    storage.write_bytes(uri, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(StorageError, match="f.bin"):
        storage.write_bytes(uri, b"new")
    assert storage.read_bytes(uri) == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


@pytest.mark.reliability
def test_failed_s3_upload_leaves_old_object(s3_endpoint, s3_bucket):
    uri = f"s3://{s3_bucket}/ckpt/latest.pt"
    storage.write_bytes(uri, b"previous")
    s3_endpoint.stop()
    try:
        with pytest.raises(StorageError, match="latest.pt"):
            # bounded retries, then a clear error
            storage.write_bytes(uri, b"x" * 10)
    finally:
        s3_endpoint.start()
    assert storage.read_bytes(uri) == b"previous"


def test_publish_dir_replaces_atomically(root, tmp_path):
    src1 = tmp_path / "v1"
    (src1 / "part").mkdir(parents=True)
    (src1 / "part" / "a.txt").write_text("1")
    (src1 / "stale.txt").write_text("s")
    dest = storage.join(root, "dataset")
    storage.publish_dir(src1, dest)
    assert storage.read_text(storage.join(dest, "part", "a.txt")) == "1"
    src2 = tmp_path / "v2"
    (src2 / "part").mkdir(parents=True)
    (src2 / "part" / "a.txt").write_text("2")
    storage.publish_dir(src2, dest)
    assert storage.list_files(dest) == [storage.join(dest, "part", "a.txt")]
    assert storage.read_text(storage.join(dest, "part", "a.txt")) == "2"


def test_upload_download_and_local_copy(root, tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    uri = storage.join(root, "w", "w.bin")
    storage.upload_file(f, uri)
    with storage.local_copy(uri) as p:
        assert p.read_bytes() == b"weights"
    assert storage.download_file(uri, tmp_path / "d" / "x.bin").read_bytes() == b"weights"


def test_pyarrow_filesystem_reads_parquet(root):
    table = pa.table({"id": [1, 2, 3]})
    uri = storage.join(root, "t", "t.parquet")
    fs, path = storage.filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).column("id").to_pylist() == [1, 2, 3]


@pytest.mark.reliability
@pytest.mark.parametrize("uri", ["gs://bucket/x", "http://example/x", "ftp://h/p"])
def test_unsupported_scheme_named(uri):
    with pytest.raises(StorageError, match="unsupported scheme"):
        storage.read_bytes(uri)


def test_s3_uri_needs_bucket():
    with pytest.raises(StorageError, match="needs a bucket"):
        storage.filesystem("s3:///key")


@pytest.mark.reliability
def test_unwritable_root_is_named(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    blocker = ro / "file"
    blocker.write_text("x")
    # a root below a regular file can never be created, even as root user
    with pytest.raises(StorageError, match="storage root .*file/sub is not writable"):
        storage.ensure_writable(str(blocker / "sub"))


def test_staged_publish_replaces_whole_and_marker_last(root):
    out = storage.join(root, "set")
    with storage.staged_publish(out, marker="manifest.json") as staging:
        storage.write_bytes(storage.join(staging, "a.bin"), b"1")
        storage.write_bytes(storage.join(staging, "old.bin"), b"stale")
        storage.write_json(storage.join(staging, "manifest.json"), {"v": 1})
        assert not storage.exists(storage.join(out, "manifest.json"))  # nothing visible before the block ends
    with storage.staged_publish(out, marker="manifest.json") as staging:
        storage.write_bytes(storage.join(staging, "a.bin"), b"2")
        storage.write_json(storage.join(staging, "manifest.json"), {"v": 2})
    assert storage.list_files(out) == [storage.join(out, "a.bin"), storage.join(out, "manifest.json")]
    assert storage.read_bytes(storage.join(out, "a.bin")) == b"2" and storage.read_json(
        storage.join(out, "manifest.json")) == {"v": 2}
    # no staging left beside the target (hidden names included)
    parent = out.rsplit("/", 1)[0]
    fs, path = storage.filesystem(parent)
    import pyarrow.fs as pafs

    names = {i.path.rsplit("/", 1)[-1] for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))}
    assert not any(".staging-" in n for n in names), names


def test_staged_publish_failure_leaves_the_old_content(root):
    out = storage.join(root, "set")
    with storage.staged_publish(out, marker="manifest.json") as staging:
        storage.write_bytes(storage.join(staging, "a.bin"), b"old")
        storage.write_json(storage.join(staging, "manifest.json"), {"v": 1})
    with pytest.raises(RuntimeError, match="half-way"):
        with storage.staged_publish(out, marker="manifest.json") as staging:
            storage.write_bytes(storage.join(staging, "a.bin"), b"new")
            raise RuntimeError("died half-way")
    assert storage.read_bytes(storage.join(out, "a.bin")) == b"old"
    assert storage.read_json(storage.join(out, "manifest.json")) == {"v": 1}


def test_staging_of_a_killed_process_is_removed_by_the_next_publish(tmp_path):
    import subprocess
    import sys

    out = str(tmp_path / "data" / "set")
    code = ("import os, sys; from pipeline import storage\n"
            "with storage.staged_publish(sys.argv[1]) as s:\n"
            "    storage.write_bytes(storage.join(s, 'x.bin'), b'x'); os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code, out]).returncode == 9
    left = [p.name for p in (tmp_path / "data").iterdir()]
    assert any(".staging-" in n for n in left), left  # the killed process left its staging behind
    with storage.staged_publish(out) as staging:
        storage.write_bytes(storage.join(staging, "y.bin"), b"y")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["set"]
    assert storage.list_files(out) == [storage.join(out, "y.bin")]


def test_list_entries_sizes_and_a_single_file(root):
    a = storage.join(root, "d", "a.parquet")
    storage.write_bytes(a, b"12345")
    storage.write_bytes(storage.join(root, "d", ".hidden", "h.parquet"), b"h")
    [entry] = storage.list_entries(storage.join(root, "d"), suffix=".parquet")
    assert (entry.uri, entry.rel, entry.size) == (a, "a.parquet", 5)
    assert [e.uri for e in storage.list_entries(a)] == [a]
