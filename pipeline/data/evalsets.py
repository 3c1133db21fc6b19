"""`sketchgan evalset create`: the real images whose sketches are nearest a sketch set (the FID reference).

Sketch distance (documented, simple, cheap at LSUN scale): every sketch is reduced to a descriptor, the
truncated distance transform of its lines. The sketch is resized (antialiased) to 64×64, its line pixels are
those darker than mid-grey, each pixel gets its Euclidean distance to the nearest line pixel in units of the
image width, clipped at 0.25 (a sketch without lines is 0.25 everywhere), and the map is averaged over 2×2
cells to 32×32. The distance between two sketches is the root-mean-square difference of their descriptors
(L2 / sqrt(1024)); an image's distance to a sketch set is its distance to the nearest sketch of the set. The
``n`` dataset images with the smallest distances (ties broken by id) form the evaluation set.

Scoring runs as Ray Data tasks over the dataset's sketches; only (id, distance) pairs come back to the driver,
then the chosen images are read in a second pass. Stored as `pipeline.layout` says: a
table of (``id``, ``image`` PNG RGB, ``size``, ``distance``) and a manifest (``name``, ``id``, ``count``, ``size``,
``sketchset_id``, ``dataset``), published whole, manifest last.
"""

from __future__ import annotations

import hashlib
import io
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline import layout, storage
from pipeline.config import Config
from pipeline.data.images import decode_png
from pipeline.layout import EvalSetError
from pipeline.names import validate_name
from pipeline.raysession import ensure_ray

DT_RES = 64  # resolution of the distance transform
DESC_RES = 32  # descriptor resolution after 2×2 averaging
DT_CLIP = 0.25  # distances beyond a quarter of the width count the same
DEFAULT_N = 1000


def sketch_descriptors(sketches: np.ndarray) -> np.ndarray:
    """uint8 N×H×W sketches (dark lines on white) -> float32 N×1024 truncated distance-transform descriptors."""
    from scipy.ndimage import distance_transform_edt

    out = np.empty((len(sketches), DESC_RES * DESC_RES), np.float32)
    for i, s in enumerate(sketches):
        small = np.asarray(Image.fromarray(np.asarray(s, np.uint8), "L").resize((DT_RES, DT_RES), Image.BOX))
        lines = small < 128
        if lines.any():
            dt = np.minimum(distance_transform_edt(~lines) / DT_RES, DT_CLIP)
        else:
            dt = np.full((DT_RES, DT_RES), DT_CLIP)
        k = DT_RES // DESC_RES
        out[i] = dt.reshape(DESC_RES, k, DESC_RES, k).mean(axis=(1, 3)).ravel()
    return out


def set_distance(descriptors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """RMS descriptor distance of each row of ``descriptors`` to its nearest row of ``queries``."""
    best = np.full(len(descriptors), np.inf)
    for q in queries.astype(np.float64):  # a handful of sketches: exact differences, no expansion round-off
        best = np.minimum(best, np.square(descriptors - q).sum(1))
    return np.sqrt(best / descriptors.shape[1])


def _score_batch(batch: pa.Table, queries: np.ndarray) -> pa.Table:
    sketches = np.stack([decode_png(b) for b in batch.column("sketch").to_pylist()])
    return pa.table({"id": batch.column("id"), "distance": set_distance(sketch_descriptors(sketches), queries)})


def nearest_ids(pairs_uri: str, queries: np.ndarray, n: int) -> list[tuple[str, float]]:
    """The ``n`` (id, distance) of the dataset whose sketches are nearest the query descriptors."""
    import ray
    import ray.data

    ensure_ray()
    fs, path = storage.filesystem(pairs_uri)
    ds = ray.data.read_parquet(path, filesystem=fs, columns=["id", "sketch"], partitioning=None)
    scored = ds.map_batches(_score_batch, fn_kwargs={"queries": queries}, batch_format="pyarrow", batch_size=256)
    table = pa.concat_tables(ray.get(scored.to_arrow_refs()))
    order = np.lexsort((np.array(table["id"].to_pylist(), dtype=object), table["distance"].to_numpy()))[:n]
    ids, dist = table["id"].to_pylist(), table["distance"].to_numpy()
    return [(ids[i], float(dist[i])) for i in order]


def create_evalset(cfg: Config, sketchset: str, dataset: str | None = None, n: int | None = None,
                   out: str | None = None, name: str | None = None, ids: list[str] | None = None) -> dict:
    """Create (or replace) the evaluation set for ``sketchset``: the ``n`` real images whose sketches are nearest
    the set's, or, with ``ids``, the dataset's images of those ids (when the category's labels are known, e.g.
    images of the sketched class held out from the sketch set); returns its manifest."""
    from pipeline.data.sketchsets import load_sketch_set

    dataset = dataset or layout.dataset_uri(cfg)
    n = DEFAULT_N if n is None else n
    if n < 1:
        raise EvalSetError(f"--n must be at least 1, got {n}")
    try:
        stored = layout.open_dataset(dataset)
    except layout.DatasetError as exc:
        raise EvalSetError(str(exc)) from None
    s_manifest, sketches = load_sketch_set(sketchset)
    name = validate_name(name or s_manifest.get("name") or "evalset", "evaluation set name")
    out = out or layout.evalset_uri(cfg, name)
    pairs = stored.pairs_uri
    if ids is not None:
        # as for sketch sets, an id is a row id or a source key (e.g. an LSUN key)
        wanted = list(dict.fromkeys(ids))[:n]
        values = pa.array(wanted)
        found = storage.read_parquet(pairs, ["id", "source_key"],
                                     filter=pc.field("id").isin(values) | pc.field("source_key").isin(values))
        row_of = {}
        for rid, key in zip(found["id"].to_pylist(), found["source_key"].to_pylist()):
            row_of.setdefault(rid, rid)
            row_of.setdefault(key, rid)
        missing = [i for i in wanted if i not in row_of]
        if missing:
            raise EvalSetError(f"evaluation set {name}: {len(missing)} of the given ids are not in dataset {dataset} "
                               f"(neither a row id nor a source key; first: {', '.join(missing[:3])})")
        chosen = list({row_of[i]: (row_of[i], float("nan")) for i in wanted}.values())
    else:
        chosen = nearest_ids(pairs, sketch_descriptors(sketches), n)
    if not chosen:
        raise EvalSetError(f"evaluation set {name}: no ids given" if ids is not None else
                           f"dataset {dataset} has no images")
    rank = {rid: i for i, (rid, _) in enumerate(chosen)}
    table = storage.read_parquet(pairs, ["id", "image", "size"], filter=pc.field("id").isin(pa.array(list(rank))))
    rows = sorted(zip(table["id"].to_pylist(), table["image"].to_pylist(), table["size"].to_pylist()),
                  key=lambda r: rank[r[0]])
    rows = list({r[0]: r for r in rows}.values())  # one row per id even if the dataset repeats one
    images = pa.table({"id": pa.array([r[0] for r in rows], pa.string()), "image": pa.array([r[1] for r in rows],
                                                                                             pa.binary()),
                       "size": pa.array([int(r[2]) for r in rows], pa.int64()),
                       "distance": pa.array([chosen[rank[r[0]]][1] for r in rows], pa.float64())})
    h = hashlib.sha256(str(s_manifest.get("id")).encode())
    for rid, img in zip(images["id"].to_pylist(), images["image"].to_pylist()):
        h.update(rid.encode() + b"\0" + hashlib.sha256(img).digest())
    sizes = sorted(set(images["size"].to_pylist()))
    manifest = {
        "name": name, "id": h.hexdigest()[:24], "count": images.num_rows,
        "size": sizes[0] if len(sizes) == 1 else sizes,
        "sketchset_id": s_manifest.get("id"), "sketchset": sketchset, "dataset": dataset,
        "dataset_id": stored.id, "requested": n,
        "distance": (f"RMS of truncated distance transforms ({DT_RES}px, clip {DT_CLIP}, {DESC_RES}x{DESC_RES}), "
                     "nearest sketch of the set") if ids is None else "none: images chosen by id",
        "max_distance": float(images["distance"].to_numpy().max()) if ids is None else None,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    layout.publish_table_set(out, layout.EVALSET_IMAGES, images, manifest)
    return {**manifest, "uri": out}


PARTS = ("validation", "test")
VALIDATION_SHARE = 0.5  # of an evaluation set's images, chosen by content hash


def part_of(image_png: bytes) -> str:
    """``validation`` or ``test`` for an image, from the hash of its bytes: the split is disjoint, the same in
    every run and process, and an image keeps its part whichever set or order it comes in."""
    u = int.from_bytes(hashlib.sha256(image_png).digest()[:8], "big") / 2**64
    return "validation" if u < VALIDATION_SHARE else "test"


def load_evalset(uri: str, part: str | None = None) -> tuple[dict, np.ndarray]:
    """(manifest, uint8 N×H×W×3 images) of a stored evaluation set, or of its ``validation`` or ``test`` part
    (`part_of`); an undecodable image is refused by id."""
    if part is not None and part not in PARTS:
        raise ValueError(f"evaluation set part must be one of {PARTS} or None, got {part!r}")
    stored = layout.open_evalset(uri)
    try:
        table = storage.read_parquet(stored.images_uri, ["id", "image"])
    except (OSError, ValueError, KeyError) as exc:
        raise EvalSetError(f"evaluation set {uri}: cannot read its images ({exc})") from None
    images = []
    for rid, png in zip(table["id"].to_pylist(), table["image"].to_pylist()):
        if part is not None and part_of(png) != part:
            continue
        try:
            with Image.open(io.BytesIO(png)) as im:
                images.append(np.asarray(im.convert("RGB")))
        except Exception as exc:  # noqa: BLE001 - any decoding failure names the row
            raise EvalSetError(f"evaluation set {uri}: image {rid!r} is not a readable image ({exc})") from None
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise EvalSetError(f"evaluation set {uri}: images of different sizes {sorted(shapes)}")
    return stored.manifest, np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8)
