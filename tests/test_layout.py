"""The storage contract's typed readers: complete artefacts are read, incomplete ones refused by name."""

import pyarrow as pa
import pytest
from tiny_data import write_pairs_dataset, write_sketch_set

from pipeline import layout, storage


def test_dataset_reader(tmp_path):
    uri = str(tmp_path / "datasets" / "shapes")
    with pytest.raises(layout.DatasetError, match=r"datasets/shapes is missing or incomplete \(no manifest.json\)"):
        layout.open_dataset(uri)
    write_pairs_dataset(uri, n=4)
    ds = layout.open_dataset(uri)
    assert ds.id == "tiny-0-4" and ds.pairs_uri == f"{uri}/pairs"
    storage.delete_prefix(ds.pairs_uri)
    with pytest.raises(layout.DatasetError, match="has no image/sketch pairs"):
        layout.open_dataset(uri)
    assert layout.open_dataset(uri, need_pairs=False).id == "tiny-0-4"


def test_sketch_set_reader(tmp_path):
    uri = str(tmp_path / "sketchsets" / "tri")
    with pytest.raises(layout.SketchSetError, match="sketch set 'tri' not found"):
        layout.read_sketch_set(uri, "tri")
    write_sketch_set(uri, n=3, name="tri")
    stored = layout.read_sketch_set(uri)
    assert stored.name == "tri" and len(stored.ids) == len(stored.blobs) == 3 and stored.blobs[0][:4] == b"\x89PNG"
    storage.write_parquet(layout.sketches_uri(uri), pa.table({"id": pa.array([], pa.string()),
                                                              "sketch": pa.array([], pa.binary())}))
    with pytest.raises(layout.SketchSetError, match=r"empty \(no rows\)"):
        layout.read_sketch_set(uri)


def test_evalset_and_run_readers(tmp_path):
    uri = str(tmp_path / "evalsets" / "e")
    with pytest.raises(layout.EvalSetError, match="not found"):
        layout.open_evalset(uri)
    storage.write_bytes(layout.evalset_images_uri(uri), b"x")
    with pytest.raises(layout.EvalSetError, match=r"incomplete \(no manifest.json\)"):
        layout.open_evalset(uri)
    storage.write_json(layout.manifest_uri(uri), {"id": "abc"})
    assert layout.open_evalset(uri).id == "abc"

    run = str(tmp_path / "runs" / "r")
    assert layout.finished_run(run) is None and layout.read_run_info(run) is None
    with pytest.raises(FileNotFoundError, match="has not finished"):
        layout.open_finished_run(run)
    storage.write_json(layout.final_metadata_uri(run), {"iterations": 3})
    finished = layout.open_finished_run(run)
    assert finished.metadata == {"iterations": 3} and finished.g_uri == f"{run}/final/G.pth"
    assert layout.run_name_of_checkpoint(finished.g_uri) == "r"
    assert layout.checkpoint_metadata_uri(finished.g_uri) == layout.final_metadata_uri(run)
