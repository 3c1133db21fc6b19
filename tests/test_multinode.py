"""Two Ray nodes on one machine: a token-auth head and a second node that joins it, each on its own loopback
address with its own resources; storage on the loopback S3 endpoint; an `mlflow server`. The whole chain is
submitted with `ray job submit`: preprocessing's read tasks run on both nodes, a two-worker training run puts
one worker on each (`train.placement_strategy=SPREAD`), then the second node is killed mid-run. The run
restarts from its latest checkpoint on the head alone and finishes: every logged iteration once, one
registered version.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow_server import MlflowServer
from ray_head import RayHead, RayNode

from pipeline import layout, storage

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]
REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "benchmarks" / "assets" / "shapes_base"
ITERATIONS, EVERY = 240, 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_endpoint):
    work = tmp_path_factory.mktemp("multinode")
    bucket = s3_endpoint.new_bucket("multinode")
    mlflow = MlflowServer(work / "mlflow", s3_endpoint.env, bucket, prefix="mlflow-artifacts").start()
    env = {**s3_endpoint.env, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    head = RayHead(work / "ray", num_cpus=2, env={**env, "MLFLOW_TRACKING_URI": mlflow.url})
    node = None
    try:
        head.start()
        node = RayNode(head, num_cpus=2, env=env).start()
        yield head, node, mlflow, bucket, work
    finally:
        if node is not None:
            node.kill()
        head.stop()
        mlflow.stop()


def alive_train_workers(head: RayHead) -> list[dict]:
    actors = head.api("/api/v0/actors?limit=1000&detail=1")["data"]["result"]["result"]
    return [a for a in actors if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"]


def finished_task_nodes(head: RayHead, name_part: str) -> list[str]:
    tasks = head.api("/api/v0/tasks?limit=10000&detail=1")["data"]["result"]["result"]
    return [t["node_id"] for t in tasks if name_part in t["name"] and t["state"] == "FINISHED"]


def test_two_nodes_spread_work_and_survive_losing_one(cluster):
    head, node, mlflow, bucket, work = cluster
    from pipeline.data import synthetic

    root = f"s3://{bucket}/root"
    for name in ("G.pth", "D.pth"):  # the base comes from the bucket, as on a real cluster
        storage.write_bytes(f"s3://{bucket}/bases/shapes/{name}", (BASE / name).read_bytes())
    lmdb_dir = work / "lsun" / "shapes"
    labels = synthetic.write_shapes_lmdb(str(lmdb_dir), n=700, size=32, seed=5)  # 3 key ranges: 3 read tasks
    ids_file = work / "triangles.txt"
    ids_file.write_text("\n".join([k for k, v in labels.items() if v == "triangle"][:6]) + "\n")
    sets = [{"name": "triangles", "from_ids": str(ids_file)}]
    overrides = [f"storage.root={root}", f"data.source={lmdb_dir}", f"train.sketch_sets={json.dumps(sets)}",
                 f"model.base_g=s3://{bucket}/bases/shapes/G.pth", f"model.base_d=s3://{bucket}/bases/shapes/D.pth",
                 "train.num_workers=2", "train.cpus_per_worker=1", "train.placement_strategy=SPREAD",
                 f"train.iterations={ITERATIONS}", "train.batch_size=8", f"train.checkpoint_every={EVERY}",
                 f"train.log_every={EVERY}", "train.sample_every=120", "eval.n_samples=40", "eval.batch_size=20",
                 "eval.name=multinode"]
    args = ["--runtime-env", "infra/runtime_env.yaml", "--working-dir", ".", "--", "python", "jobs/pipeline.py",
            "--config", "configs/tiny.yaml"]
    for o in overrides:
        args += ["--set", o]
    run_uri = f"{root}/runs/train-triangles"
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(head.submit, args, REPO, timeout=1500)
        # both workers up, one on each node, and a few checkpoints written: then lose the second node
        deadline, placed = time.time() + 900, []
        while time.time() < deadline and not job.done():
            placed = sorted(a["node_id"] for a in alive_train_workers(head))
            ckpts = storage.list_files(f"{run_uri}/checkpoints", suffix=".pt")
            if len(placed) == 2 and len(ckpts) >= 2:
                break
            time.sleep(0.5)
        assert placed == sorted([head.head_node_id(), node.node_id]), f"workers on {placed}"
        killed_at = max(layout.read_metrics(run_uri), key=lambda r: r["iteration"])["iteration"]
        assert killed_at < ITERATIONS, "the run finished before the node could be killed"
        node.kill()
        proc = job.result()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]

    # preprocessing read the LMDB on both nodes
    read_nodes = finished_task_nodes(head, "ReadLSUN-LMDB")
    assert set(read_nodes) == {head.head_node_id(), node.node_id}, read_nodes
    # the run restarted once from a checkpoint at or after the kill, and logged every iteration exactly once
    meta = layout.open_finished_run(run_uri).metadata
    assert len(meta["resumed_at"]) == 1 and meta["resumed_at"][0] % EVERY == 0, meta["resumed_at"]
    assert killed_at - EVERY <= meta["resumed_at"][0] <= ITERATIONS, (killed_at, meta["resumed_at"])
    assert [r["iteration"] for r in layout.read_metrics(run_uri)] == list(range(EVERY, ITERATIONS + 1, EVERY))
    assert meta["final_metrics"]["iteration"] == ITERATIONS
    # one registered version, whose artefacts are the finished run's generator
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow.url)
    versions = client.search_model_versions("name='sketchgan-shapes-triangles'")
    assert len(versions) == 1, [v.version for v in versions]
    assert client.get_model_version_by_alias("sketchgan-shapes-triangles", "champion").version == versions[0].version
    print(f"read tasks per node {sorted((n[:8], read_nodes.count(n)) for n in set(read_nodes))}; workers on "
          f"{[n[:8] for n in placed]}; node killed at iteration {killed_at}, resumed at {meta['resumed_at']}; "
          f"version {versions[0].version}")
