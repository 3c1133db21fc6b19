"""The studio's API: in process (TestClient) for drawings, sketch sets, limits and the token; then a real
`sketchgan studio` process whose runs are `sketchgan train` jobs on the local Ray instance it starts."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from studio_server import StudioServer, write_studio_root

from pipeline import layout
from pipeline.config import load_config
from pipeline.data.sketchsets import load_sketch_set
from pipeline.demo import BASE_DIR
from pipeline.studio.app import create_app
from pipeline.studio.server import StudioSecurityError, studio_token
from pipeline.studio.settings import TOKEN_ENV


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def drawing(i: int = 0, size=(300, 200), mode: str = "RGB") -> bytes:
    """A square outline, drawn large and off-square like a canvas export."""
    im = Image.new(mode, size, "white" if mode == "RGB" else (255, 255, 255, 0))
    ImageDraw.Draw(im).rectangle((60 + 5 * i, 30, 200 - 5 * i, 170), outline="black", width=10)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A 1-bit PNG whose header claims 900 million pixels, in under a megabyte."""
    raw = zlib.compress(b"".join(b"\x00" + b"\x00" * (width // 8) for _ in range(height)), 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def studio_cfg(tmp_path_factory):
    config = write_studio_root(tmp_path_factory.mktemp("studio-api"))
    return load_config(config, [f"model.base_g={BASE_DIR / 'G.pth'}", f"model.base_d={BASE_DIR / 'D.pth'}",
                                "studio.max_upload_bytes=200000", "studio.max_sketches=5"])


@pytest.fixture(scope="module")
def client(studio_cfg):
    return TestClient(create_app(studio_cfg))


def test_preview_is_what_sketchset_create_stores(client, studio_cfg, tmp_path):
    res = client.post("/api/sketches/preview", json={"image": data_url(drawing(mode="RGBA"))})
    assert res.status_code == 200, res.text
    preview = np.asarray(Image.open(io.BytesIO(base64.b64decode(res.json()["preview"].split(",", 1)[1]))))
    assert preview.shape == (32, 32)  # one channel, the model's size
    assert preview.min() < 80 and preview.max() == 255  # the outline dark, the transparent background white
    # the same drawing through `sketchset create` gives the same pixels
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.png").write_bytes(drawing(mode="RGBA"))
    from pipeline.data.sketchsets import create_sketch_set

    man = create_sketch_set(studio_cfg, "cli-made", from_dir=str(tmp_path / "d"))
    assert np.array_equal(load_sketch_set(man["uri"])[1][0], preview)


@pytest.mark.parametrize("payload, message", [
    (data_url(b"hello, not a picture"), "not a known image format"),
    (data_url(bomb_png()), "decompression bomb refused"),
    (data_url(drawing()[:200]), "truncated"),
    (data_url(b"\x89PNG" + bytes(300_000)), "too large"),
    ("http://example.com/a.png", "expected a data URL"),
    ("data:image/png;base64,@@@@", "not valid base64"),
])
def test_bad_uploads_are_refused_with_their_reason(client, payload, message):
    res = client.post("/api/sketches/preview", json={"image": payload})
    assert res.status_code == 400
    assert message in res.json()["detail"]


def test_sketch_set_saved_from_drawings(client, studio_cfg):
    res = client.post("/api/sketchsets", json={"name": "boxes", "sketches": [data_url(drawing(i)) for i in range(3)]})
    assert res.status_code == 201, res.text
    body = res.json()
    assert body["count"] == 3 and body["size"] == 32 and "from_dir" not in body  # no server path leaks
    manifest, sketches = load_sketch_set(layout.sketchset_uri(studio_cfg, "boxes"))
    assert manifest["id"] == body["id"] and sketches.shape == (3, 32, 32)
    listed = {s["name"]: s for s in client.get("/api/sketchsets").json()["sketchsets"]}
    assert listed["boxes"]["count"] == 3
    assert client.get("/api/sketchsets/boxes/sketches.png").headers["content-type"] == "image/png"
    # the same name again: refused unless replacing
    again = client.post("/api/sketchsets", json={"name": "boxes", "sketches": [data_url(drawing())]})
    assert again.status_code == 409 and "exists" in again.json()["detail"]
    replaced = client.post("/api/sketchsets", json={"name": "boxes", "sketches": [data_url(drawing())],
                                                    "replace": True})
    assert replaced.status_code == 201 and replaced.json()["count"] == 1
    import ray

    assert not ray.is_initialized()  # asking whether runs use the set started no Ray of its own


@pytest.mark.parametrize("body, message", [
    ({"name": "../escape", "sketches": [data_url(drawing())]}, "is not allowed"),
    ({"name": "empty", "sketches": []}, "at least one sketch"),
    ({"name": "many", "sketches": [data_url(drawing())] * 6}, "at most 5"),
    ({"name": "mixed", "sketches": [data_url(drawing()), data_url(b"junk")]}, "sketch 2: undecodable"),
])
def test_bad_sketch_sets_are_refused_and_nothing_is_written(client, studio_cfg, body, message):
    res = client.post("/api/sketchsets", json=body)
    assert res.status_code == 400 and message in res.json()["detail"]
    if body["name"] != "../escape":
        assert not layout.sketch_set_exists(layout.sketchset_uri(studio_cfg, body["name"]))


def test_two_browsers_saving_one_name_at_once_get_one_whole_set(client, studio_cfg):
    answers = []

    def save(i: int):
        sketches = [data_url(drawing(i)) for _ in range(2 + i)]
        answers.append(client.post("/api/sketchsets", json={"name": "race", "sketches": sketches}))

    threads = [threading.Thread(target=save, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(a.status_code for a in answers)
    assert codes == [201, 409]
    winner = next(a.json() for a in answers if a.status_code == 201)
    manifest, sketches = load_sketch_set(layout.sketchset_uri(studio_cfg, "race"))
    assert manifest["id"] == winner["id"] and len(sketches) == winner["count"]


def test_base_samples_and_documented_api(client):
    res = client.get("/api/base/samples.png?n=4&seed=3")
    assert res.status_code == 200
    im = Image.open(io.BytesIO(res.content))
    assert im.width > 64 and np.asarray(im).std() > 5  # four samples of the base, not a blank
    schema = client.get("/openapi.json").json()
    for path in ("/api/sketchsets", "/api/runs", "/api/runs/{run_id}/cancel", "/api/generate", "/api/blend",
                 "/api/project", "/api/models", "/api/benchmarks"):
        assert path in schema["paths"], path
    assert "<canvas" in client.get("/").text


def test_generate_edit_and_errors(client, studio_cfg):
    res = client.post("/api/generate", json={"model": "base", "n": 4, "edits": [
        {"component": 0, "strength": 3, "first": 0, "last": 3}], "compare": True})
    assert res.status_code == 200, res.text
    grid = np.asarray(Image.open(io.BytesIO(base64.b64decode(res.json()["image"].split(",", 1)[1]))))
    top, bottom = grid[: grid.shape[0] // 2], grid[grid.shape[0] // 2:]
    assert np.abs(top.astype(int) - bottom.astype(int)).mean() > 2  # before and after the edit differ
    bad = client.post("/api/generate", json={"model": f"{studio_cfg.storage.root}/runs/no-such-run", "n": 4})
    assert bad.status_code == 400 and "a finished run (no final/metadata.json)" in bad.json()["detail"]
    assert client.post("/api/generate", json={"model": "base", "n": 1000}).status_code == 422


def test_projection_reconstructs_a_base_sample(client):
    sample = client.post("/api/generate", json={"model": "base", "n": 1, "seed": 3}).json()["image"]
    res = client.post("/api/project", json={"image": sample, "model": "base", "steps": 60})
    assert res.status_code == 200, res.text
    # measured: 60 W+ steps reach 20.8 dB on this sample, the mean latent 10.3 dB (its summary line)
    assert res.json()["psnr"] > 18
    assert "PSNR" in res.json()["summary"][1]
    bad = client.post("/api/project", json={"image": data_url(b"junk"), "steps": 5})
    assert bad.status_code == 400 and "picture: undecodable" in bad.json()["detail"]


def test_pictures_are_made_two_at_a_time(studio_cfg, monkeypatch):
    from pipeline.studio import pictures

    release, started = threading.Event(), threading.Semaphore(0)
    real = pictures.generate_png

    def slow(*args, **kwargs):  # holds its slot until released, so that a third request finds none free
        started.release()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(pictures, "generate_png", slow)
    app = TestClient(create_app(studio_cfg))
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(
        app.post("/api/generate", json={"model": "base", "n": 1}).status_code)) for _ in range(2)]
    for t in threads:
        t.start()
    assert started.acquire(timeout=30) and started.acquire(timeout=30)
    third = app.post("/api/generate", json={"model": "base", "n": 1})
    assert third.status_code == 429 and "busy" in third.json()["detail"]
    release.set()
    for t in threads:
        t.join()
    assert answers == [200, 200]


def test_token_required_when_set(studio_cfg):
    token = "t" * 40
    guarded = TestClient(create_app(studio_cfg, token=token))
    assert guarded.get("/api/info").status_code == 401
    assert guarded.get("/api/info", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
    assert guarded.get("/api/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    # the page's address with the token: a cookie, then the token out of the address bar
    first = guarded.get(f"/?token={token}", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/"
    assert "httponly" in first.headers["set-cookie"].lower()
    assert guarded.get("/api/info").status_code == 200  # the client kept the cookie


def test_pages_name_only_the_studio_s_models(client, studio_cfg, tmp_path):
    secret_file = tmp_path / "G.pth"
    secret_file.write_bytes(b"not for pages")
    for ref in (str(secret_file), str(tmp_path), "s3://someone-elses-bucket/G.pth", "models:/other-model/1",
                f"{studio_cfg.storage.root}/runs/../../etc", "/etc/passwd"):
        res = client.post("/api/generate", json={"model": ref, "n": 1})
        assert res.status_code == 400 and "unknown model" in res.json()["detail"], ref
        assert client.post("/api/blend", json={"a": "base", "b": ref}).status_code == 400


def test_bodies_are_bounded_and_pages_not_framed(client, studio_cfg):
    huge = "x" * (studio_cfg.studio.max_sketches * studio_cfg.studio.max_upload_bytes * 2)
    res = client.post("/api/sketchsets", content=huge, headers={"content-type": "application/json"})
    assert res.status_code == 413 and "request too large" in res.json()["detail"]
    page = client.get("/")
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_a_loopback_studio_answers_only_loopback_names(studio_cfg):
    from pipeline.studio.server import allowed_hosts

    guarded = TestClient(create_app(studio_cfg, allowed_hosts=allowed_hosts("127.0.0.1")),
                         base_url="http://127.0.0.1:8765")
    assert guarded.get("/api/info").status_code == 200
    assert guarded.get("/api/info", headers={"host": "localhost:8765"}).status_code == 200
    # a page of another site whose name now points at 127.0.0.1 (DNS rebinding)
    assert guarded.get("/api/info", headers={"host": "attacker.example:8765"}).status_code == 400
    assert allowed_hosts("0.0.0.0") is None  # every address: the token protects it


def test_other_addresses_need_a_token(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert studio_token("127.0.0.1") is None and studio_token("localhost") is None
    with pytest.raises(StudioSecurityError, match=TOKEN_ENV):
        studio_token("0.0.0.0")
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(StudioSecurityError, match="too short"):
        studio_token("0.0.0.0")
    monkeypatch.setenv(TOKEN_ENV, "x" * 32)
    assert studio_token("0.0.0.0") == "x" * 32


def test_cli_refuses_a_public_address_without_a_token(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in __import__("os").environ.items() if k != TOKEN_ENV}
    proc = subprocess.run([str(Path(sys.executable).parent / "sketchgan"), "studio", "--host", "0.0.0.0",
                           "--port", "1"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert "refusing to listen on 0.0.0.0 without a token" in proc.stderr


# -- a real studio process: runs as Ray jobs on the local instance it starts -----------------------------------
SECRET = "studio-secret-value-7f3a9c"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    work = tmp_path_factory.mktemp("studio-runs")
    server = StudioServer(work, write_studio_root(work), env={"AWS_SECRET_ACCESS_KEY": SECRET}).start()
    try:
        yield server
    finally:
        server.stop()


def test_runs_launch_progress_compare_cancel_and_failure(studio):
    code, saved = studio.request("POST", "/api/sketchsets",
                                 {"name": "boxes", "sketches": [data_url(drawing(i)) for i in range(4)]})
    assert code == 201, saved
    # two browsers launch at once: two runs
    launched = []

    def launch():
        launched.append(studio.request("POST", "/api/runs", {"sketch_set": "boxes", "iterations": 20}))

    threads = [threading.Thread(target=launch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [c for c, _ in launched] == [202, 202], launched
    ids = {r["id"] for _, r in launched}
    assert len(ids) == 2
    # a third, cancelled while it runs
    code, third = studio.request("POST", "/api/runs", {"sketch_set": "boxes", "iterations": 5000})
    assert code == 202
    running = studio.wait_run(third["id"], states=("RUNNING",), timeout=240)
    assert running["status"] == "RUNNING"
    # its sketch set cannot be replaced under it
    code, body = studio.request("POST", "/api/sketchsets", {"name": "boxes", "sketches": [data_url(drawing())],
                                                            "replace": True})
    assert code == 409 and third["id"] in body["detail"], body
    code, _ = studio.request("POST", f"/api/runs/{third['id']}/cancel")
    assert code == 200
    assert studio.wait_run(third["id"])["status"] == "STOPPED"

    for run_id in ids:
        run = studio.wait_run(run_id)
        assert run["status"] == "SUCCEEDED", run
        assert run["iteration"] == 20 and run["sample_iteration"] == 20
        assert set(run["losses"]) >= {"loss_g_sketch", "loss_d_sketch", "loss_g_image", "loss_d_image"}
        code, sample = studio.request("GET", f"/api/runs/{run_id}/sample.png")
        assert code == 200 and Image.open(io.BytesIO(sample)).size[0] >= 4 * 32
        code, compare = studio.request("GET", f"/api/runs/{run_id}/compare.png?n=8&seed=0")
        assert code == 200
        figure = np.asarray(Image.open(io.BytesIO(compare)).convert("RGB"))
        assert figure.shape[0] >= 3 * 96  # sketches, base, customised: tiles upscaled to at least 96 px
    # both runs registered; the registry and the targets list them
    code, models = studio.request("GET", "/api/models")
    assert models["error"] is None
    versions = [v for m in models["models"] if m["name"] == "sketchgan-shapes-boxes" for v in m["versions"]]
    assert len(versions) == 2 and any("champion" in v["aliases"] for v in versions)
    code, targets = studio.request("GET", "/api/targets")
    refs = [t["ref"] for t in targets["targets"]]
    assert "models:/sketchgan-shapes-boxes/1" in refs
    code, image = studio.request("POST", "/api/generate", {"model": "models:/sketchgan-shapes-boxes/1", "n": 4})
    assert code == 200, image

    # a run that fails shows why: a set whose stored sketches are corrupt
    bad = layout.sketchset_uri(load_config(studio.config), "broken")
    from tiny_data import write_sketch_set

    write_sketch_set(bad, n=2, name="broken")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "sketch": [b"not a png"], "size": [32]}), layout.sketches_uri(bad))
    code, failing = studio.request("POST", "/api/runs", {"sketch_set": "broken", "iterations": 5})
    assert code == 202
    failed = studio.wait_run(failing["id"])
    assert failed["status"] == "FAILED" and "sketch 'a' in " in failed["error"], failed
    assert "is unusable (undecodable" in failed["error"]

    # refused before launching: unknown sets and settings the config refuses
    code, body = studio.request("POST", "/api/runs", {"sketch_set": "nope", "iterations": 5})
    assert code == 400 and "no sketch set named 'nope'" in body["detail"]
    code, body = studio.request("POST", "/api/runs", {"sketch_set": "boxes", "augment": "zoom"})
    assert code == 400 and "augment" in body["detail"]
    # nothing of the server's environment reaches a client
    code, everything = studio.request("GET", "/api/runs")
    assert SECRET not in json.dumps(everything)
