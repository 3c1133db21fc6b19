"""End to end with real processes: a Ray head (token auth on), an `mlflow server` and the loopback S3
endpoint; the whole chain submitted with the real `ray job submit` CLI on tiny generated data, storage on
S3. Asserts the Parquet datasets, checkpoints in S3, a registered version with alias champion, and the
benchmark table; stops everything it started.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow_server import MlflowServer
from ray_head import RayHead

from pipeline import storage

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_endpoint):
    work = tmp_path_factory.mktemp("e2e")
    bucket = s3_endpoint.new_bucket("e2e")
    mlflow = MlflowServer(work / "mlflow", s3_endpoint.env, bucket, prefix="mlflow-artifacts").start()
    head_env = {**s3_endpoint.env, "MLFLOW_TRACKING_URI": mlflow.url, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    head = RayHead(work / "ray", num_cpus=2, env=head_env).start()
    try:
        yield head, mlflow, bucket, work
    finally:
        head.stop()
        mlflow.stop()


def test_whole_chain_via_ray_job_submit(cluster):
    head, mlflow, bucket, work = cluster
    from pipeline.data import synthetic

    lmdb_dir = work / "lsun" / "shapes"
    labels = synthetic.write_shapes_lmdb(str(lmdb_dir), n=120, size=32, seed=3)
    ids = [k for k, v in labels.items() if v == "triangle"][:6]
    ids_file = work / "triangles.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    root = f"s3://{bucket}/root"
    sets = [{"name": "triangles", "from_ids": str(ids_file)}]
    overrides = [f"storage.root={root}", f"data.source={lmdb_dir}", f"train.sketch_sets={json.dumps(sets)}",
                 "pretrain.iterations=12", "pretrain.batch_size=8", "train.iterations=8", "train.batch_size=4",
                 "train.checkpoint_every=4", "train.log_every=4", "eval.n_samples=40", "eval.batch_size=20",
                 "eval.name=e2e"]
    # the README's command (runtime env file included), from the repository's root
    args = ["--runtime-env", "infra/runtime_env.yaml", "--working-dir", ".", "--", "python", "jobs/pipeline.py",
            "--config", "configs/tiny.yaml"]
    for o in overrides:
        args += ["--set", o]
    proc = head.submit(args, cwd=REPO, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower()

    # Parquet datasets in S3
    pairs = storage.list_files(f"{root}/datasets/shapes/pairs", suffix=".parquet")
    assert pairs and storage.exists(f"{root}/datasets/shapes/manifest.json")
    assert storage.exists(f"{root}/sketchsets/triangles/sketches.parquet")
    # checkpoints of the customised run in S3
    ckpts = storage.list_files(f"{root}/runs/train-triangles/checkpoints", suffix=".pt")
    assert ckpts and storage.exists(f"{root}/runs/train-triangles/final/G.pth")
    # a registered model version with alias champion on the MLflow server
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow.url)
    versions = client.search_model_versions("name='sketchgan-shapes-triangles'")
    assert [v.version for v in versions] == ["1"]  # one run, one version (a fresh server)
    version = client.get_model_version_by_alias("sketchgan-shapes-triangles", "champion")
    assert version.version == "1"
    # the benchmark: the version and the base scored on the same (test part of the) evaluation set
    results = json.loads(storage.read_text(f"{root}/benchmarks/e2e/results.json"))
    rows = {(r["model"], r["baseline"]): r for r in results}
    row = rows[("sketchgan-shapes-triangles", False)]
    assert row["version"] == "1" and row["fid"] > 0 and row["fid_base"] == rows[("base", True)]["fid"]
    assert 0 <= row["precision"] <= 1 and row["sketch_fidelity"] >= 0
    assert float(client.get_model_version("sketchgan-shapes-triangles", "1").tags["fid"]) == row["fid"]
    assert "sketchgan-shapes-triangles" in storage.read_text(f"{root}/benchmarks/e2e/results.md")
