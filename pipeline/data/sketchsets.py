"""`sketchgan sketchset create`: a user's sketch set as Parquet, from a folder of drawings or dataset ids.

Drawings (PNG/JPEG/WebP of any size and mode) become one channel (transparent areas white), centre-cropped
and resized (antialiased) to the model's resolution ``model.size``. With ``--from-ids``, the sketches of a
preprocessed dataset are taken by row ``id`` or by ``source_key`` (e.g. LSUN keys). The set's ``id`` is a
hash of its content (ids and pixels), so the same drawings always give the same id.

Stored as `pipeline.layout` says: a table of (``id``, ``sketch`` PNG mode L, ``size``) and a manifest (``name``,
``id``, ``count``, ``size``, where it came from), published whole, manifest last.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline import layout, storage
from pipeline.config import Config
from pipeline.data.images import BadRecord, decode_png, encode_png, load_image
from pipeline.layout import SketchSetError
from pipeline.names import validate_name

DRAWING_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def content_id(ids: list[str], sketches: np.ndarray) -> str:
    """A hash of the ids and pixels (not of the PNG encoding)."""
    h = hashlib.sha256(f"{sketches.shape}".encode())
    for i in np.argsort(np.array(ids, dtype=object), kind="stable"):
        h.update(ids[i].encode() + b"\0")
        h.update(np.ascontiguousarray(sketches[i]).tobytes())
    return h.hexdigest()[:24]


def resize_sketch(arr: np.ndarray, size: int) -> np.ndarray:
    if arr.shape[:2] == (size, size):
        return arr
    return np.asarray(Image.fromarray(arr, "L").resize((size, size), Image.BICUBIC))


def _from_dir(uri: str, size: int, max_pixels: int) -> tuple[list[str], np.ndarray]:
    files = storage.list_files(uri)
    if not files:
        raise SketchSetError(f"no drawings below {uri}: the folder is empty or does not exist")
    others = [f for f in files if not f.lower().endswith(DRAWING_SUFFIXES)]
    if others:
        raise SketchSetError(f"{len(others)} file(s) below {uri} are not drawings ({', '.join(DRAWING_SUFFIXES)}): "
                             + ", ".join(others[:10]))
    ids, sketches, bad = [], [], []
    for f in files:
        try:
            sketches.append(load_image(storage.read_bytes(f), size, "L", max_pixels))
            ids.append(f[len(uri.rstrip("/")):].lstrip("/"))
        except BadRecord as exc:
            bad.append(f"{f} ({exc.reason})")
    if bad:
        raise SketchSetError(f"{len(bad)} drawing(s) below {uri} cannot be used: " + "; ".join(bad[:10]))
    return ids, np.stack(sketches)


def read_id_list(uri: str) -> list[str]:
    """Ids one per line; blank lines and ``#`` comments ignored; duplicates dropped (first kept)."""
    lines = [ln.split("#", 1)[0].strip() for ln in storage.read_text(uri).splitlines()]
    return list(dict.fromkeys(ln for ln in lines if ln))


def _from_ids(ids_uri: str, dataset: str, size: int) -> tuple[list[str], np.ndarray]:
    wanted = read_id_list(ids_uri)
    if not wanted:
        raise SketchSetError(f"the id list {ids_uri} is empty")
    try:
        pairs = layout.open_dataset(dataset, need_pairs=False).pairs_uri
    except layout.DatasetError as exc:
        raise SketchSetError(str(exc)) from None
    values = pa.array(wanted, pa.string())
    table = storage.read_parquet(pairs, ["id", "source_key", "sketch"],
                                 filter=pc.field("id").isin(values) | pc.field("source_key").isin(values))
    found: dict[str, bytes] = {}
    for rid, key, png in zip(table["id"].to_pylist(), table["source_key"].to_pylist(), table["sketch"].to_pylist()):
        found.setdefault(rid, png)
        found.setdefault(key, png)
    missing = [w for w in wanted if w not in found]
    if missing:
        raise SketchSetError(f"{len(missing)} id(s) of {ids_uri} are not in dataset {dataset} (neither an id nor a "
                             "source_key): " + ", ".join(missing[:10]))
    return wanted, np.stack([resize_sketch(decode_png(found[w]), size) for w in wanted])


def create_sketch_set(cfg: Config, name: str, from_dir: str | None = None, from_ids: str | None = None,
                      dataset: str | None = None, out: str | None = None) -> dict:
    """Create (or replace) the sketch set ``name``; returns its manifest."""
    name = validate_name(name, "sketch set name")
    if bool(from_dir) == bool(from_ids):
        raise SketchSetError("give exactly one of --from-dir (drawings) or --from-ids (ids of a dataset)")
    size = cfg.model.size
    if from_dir:
        ids, sketches = _from_dir(from_dir, size, cfg.data.max_image_pixels)
        origin = {"from_dir": from_dir}
    else:
        dataset = dataset or layout.dataset_uri(cfg)
        ids, sketches = _from_ids(from_ids, dataset, size)
        origin = {"from_ids": from_ids, "dataset": dataset, "dataset_id": layout.open_dataset(dataset, False).id}
    out = out or layout.sketchset_uri(cfg, name)
    table = pa.table({"id": pa.array(ids, pa.string()), "sketch": pa.array([encode_png(s) for s in sketches],
                                                                             pa.binary()),
                      "size": pa.array([size] * len(ids), pa.int64())})
    manifest = {"name": name, "id": content_id(ids, sketches), "count": len(ids), "size": size, **origin,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    layout.publish_table_set(out, layout.SKETCHES, table, manifest)
    return {**manifest, "uri": out}


def load_sketch_set(uri: str) -> tuple[dict, np.ndarray]:
    """(manifest, uint8 N×H×W sketches, dark lines on white) of a stored sketch set."""
    stored = layout.read_sketch_set(uri)
    arrays = []
    for rid, png in zip(stored.ids, stored.blobs):
        try:
            arrays.append(load_image(png, int(stored.manifest["size"]), "L"))
        except BadRecord as exc:
            raise SketchSetError(f"sketch set {uri}: sketch {rid!r} is unreadable ({exc.reason})") from None
    return stored.manifest, np.stack(arrays)
