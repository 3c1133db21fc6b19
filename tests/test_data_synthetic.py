"""Generated LSUN-format data: labelled shapes, one LMDB per category, mixed encodings, planted records."""

from __future__ import annotations

import json

import lmdb
import numpy as np
import pytest

from pipeline.data import synthetic


def test_shape_images_are_seeded_labelled_and_varied():
    a, labels = synthetic.generate_shape_images(12, 32, seed=1)
    b, _ = synthetic.generate_shape_images(12, 32, seed=1)
    c, _ = synthetic.generate_shape_images(12, 32, seed=2)
    assert a.shape == (12, 32, 32, 3) and a.dtype == np.uint8
    assert labels == ["circle", "square", "triangle"] * 4
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len({img.tobytes() for img in a}) == 12
    _, custom = synthetic.generate_shape_images(4, 16, shapes=("star", "cross"))
    assert custom == ["star", "cross", "star", "cross"]
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        synthetic.generate_shape_images(2, 16, shapes=("hexagon",))


def test_shapes_are_told_apart_by_their_compactness():
    # area / (largest distance from the centroid)^2: circle pi, square 2, triangle 1.3 (rotation-invariant)
    def compactness(img):
        mask = np.abs(img.astype(int) - img[0, 0].astype(int)).sum(-1) > 150
        ys, xs = np.nonzero(mask)
        r2 = ((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2).max()
        return mask.sum() / r2

    imgs, labels = synthetic.generate_shape_images(90, 64, seed=0)
    def flat_border(img):  # a plain background: the object is then everything that differs from it
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(int)
        return np.abs(border - img[0, 0].astype(int)).max() < 3

    flat = [i for i, img in enumerate(imgs) if flat_border(img)]
    med = {s: np.median([compactness(imgs[i]) for i in flat if labels[i] == s]) for s in synthetic.SHAPES}
    assert med["circle"] > med["square"] + 0.5 > med["triangle"] + 1.0, med


def test_lsun_layout_one_lmdb_per_category(tmp_path):
    labels = synthetic.write_lsun_lmdb(str(tmp_path), categories=("cat", "horse"), n_per_category=9, size=16,
                                       seed=3, bad_records=True)
    assert set(labels) == {"cat", "horse"}
    for category in ("cat", "horse"):
        folder = tmp_path / category
        assert (folder / "data.mdb").exists() and (folder / "lock.mdb").exists()
        assert json.loads((folder / "labels.json").read_text()) == labels[category]
        env = lmdb.open(str(folder), readonly=True, lock=False)
        with env.begin() as txn:
            items = {bytes(k).decode(): bytes(v) for k, v in txn.cursor()}
        env.close()
        good = [k for k in items if not k.startswith(("bad-", "odd-"))]
        assert len(good) == 9 and all(len(k) == 40 for k in good)
        for magic in (b"RIFF", b"\xff\xd8", b"\x89PNG"):  # WebP, JPEG and PNG values
            assert any(items[k].startswith(magic) for k in good), magic
        assert {"bad-empty", "bad-bomb", "odd-cmyk", "odd-16bit"} <= set(items)
        assert items["bad-empty"] == b"" and "bad-empty" not in labels[category]
    shapes_only = [{k for k in labels[c] if not k.startswith("odd-")} for c in ("cat", "horse")]
    assert shapes_only[0].isdisjoint(shapes_only[1])
