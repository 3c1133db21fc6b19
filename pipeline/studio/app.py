"""The studio's JSON API (documented at ``/docs``, schema at ``/openapi.json``) and its page.

Every handler calls a library stage: sketch sets are `sketchset create`'s artefact, runs are `sketchgan train`
jobs (`pipeline.studio.runs`), pictures come from `generate`, `blend`, `project` and the benchmark's comparison
rows. Errors come back as ``{"detail": message}`` naming what is wrong; nothing from the server's environment
is sent to a page (error texts are scrubbed of credentials).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from pipeline import layout, storage
from pipeline.config import Config
from pipeline.redact import scrub_text
from pipeline.studio import pictures, uploads
from pipeline.studio.runs import RunRequest, RunRequestError, Runs
from pipeline.studio.schemas import BlendBody, GenerateBody, LaunchBody, PreviewBody, ProjectBody, SketchSetBody

log = logging.getLogger("sketchgan.studio")

STATIC = Path(__file__).resolve().parent / "static"
TOKEN_COOKIE = "sketchgan_studio_token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


# -- the app --------------------------------------------------------------------------------------------------
def create_app(cfg: Config, token: str | None = None, runs: Runs | None = None,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """The studio for ``cfg``; with ``token`` every request must carry it (header, or the cookie the page
    gets from ``/?token=...``); with ``allowed_hosts`` other Host headers are refused (a page of another site
    re-pointing its name at 127.0.0.1 must not drive a studio that has no token)."""
    app = FastAPI(title="sketchgan studio", version="1",
                  description="Draw sketch sets, customise a StyleGAN2 on them with Ray, watch, compare, use.")
    runs = runs or Runs(cfg)
    set_locks: dict[str, threading.Lock] = {}
    locks_guard = threading.Lock()
    size = cfg.model.size
    limits = cfg.studio

    max_body = limits.max_sketches * (limits.max_upload_bytes * 4 // 3 + 64) + 65536  # a whole set as data URLs

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Bodies bounded before they are read; no framing by other sites."""
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"detail": "a request body needs a Content-Length"}, status_code=411)
            if int(length) > max_body:
                return JSONResponse({"detail": f"request too large ({int(length):,} bytes; at most {max_body:,})"},
                                    status_code=413)
        response = await call_next(request)
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if token is None:
            return await call_next(request)
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or \
            request.cookies.get(TOKEN_COOKIE, "")
        if given and secrets.compare_digest(given.encode(), token.encode()):
            return await call_next(request)
        query = request.query_params.get("token", "")
        if request.url.path == "/" and query and secrets.compare_digest(query.encode(), token.encode()):
            response = RedirectResponse("/", status_code=303)  # the token leaves the address bar for a cookie
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        return JSONResponse({"detail": "this studio needs its token: open the address it printed at start "
                                       "(/?token=...) or send 'Authorization: Bearer <token>'"}, status_code=401)

    runs_root = storage.join(cfg.storage.root, "runs") + "/"
    registered = f"models:/{cfg.registry.model_prefix}-"

    def model_ref(ref: str) -> str:
        """What a page may name: 'base' (the config's base), a run below this root, or one of this prefix's
        registered models; never an arbitrary file or bucket of the server's."""
        if ref == "base":
            if not cfg.model.base_g:
                raise HTTPException(400, "the studio's config has no model.base_g")
            return cfg.model.base_g
        inside_runs = ref.startswith(runs_root) and ".." not in ref and "\\" not in ref
        if inside_runs or (ref.startswith(registered) and ".." not in ref):
            return ref
        raise HTTPException(400, f"unknown model {ref!r}: choose 'base', a studio run or a registered "
                                 f"{cfg.registry.model_prefix}-* model")

    # pictures are made in the server's threads: a few at once, so that pages cannot starve training
    drawing = threading.BoundedSemaphore(2)

    @contextlib.contextmanager
    def picture_slot():
        if not drawing.acquire(blocking=False):
            raise HTTPException(429, "busy: two pictures are being made; try again in a moment")
        try:
            yield
        finally:
            drawing.release()

    def workdir() -> str:
        return tempfile.mkdtemp(prefix="studio-")

    def png(data: bytes) -> Response:
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})

    def fail(exc: Exception, status: int = 400):
        raise HTTPException(status, scrub_text(str(exc)) or type(exc).__name__) from None

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if allowed_hosts:
        from fastapi.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.exception_handler(RuntimeError)
    @app.exception_handler(OSError)
    async def jobs_api_unreachable(request: Request, exc: Exception):
        # what is left after retries: Ray's Jobs API (or storage) unreachable; said plainly, credentials masked
        return JSONResponse({"detail": f"unavailable: {scrub_text(str(exc))[:500]}"}, status_code=503)

    @app.get("/api/info", summary="the studio's base, defaults and limits")
    def info() -> dict[str, Any]:
        t = cfg.train
        return {"category": cfg.data.category, "model_size": size,
                "bases": [{"id": "base", "label": f"base: {cfg.model.base_g or '(none configured)'}"}],
                "defaults": {"iterations": t.iterations, "lambda_image": t.lambda_image, "augment": t.augment},
                # the paper's policies (GANSketching's DiffAugment: translation, with cutout / colour added)
                "augment_choices": sorted({t.augment, "", "translation", "translation,cutout",
                                           "color,translation,cutout"}),
                "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_sketches": limits.max_sketches},
                "ray": limits.ray_address or "local Ray instance"}

    @app.get("/api/base/samples.png", summary="samples of the base model (reference beside the canvas)")
    def base_samples(n: int = Query(4, ge=1, le=16), seed: int = Query(0, ge=0)):
        try:
            with picture_slot():
                return png(pictures.generate_png(cfg, model_ref("base"), n, seed))
        except (ValueError, OSError) as exc:
            fail(exc)

    @app.post("/api/sketches/preview", summary="a drawing as training sees it (one channel, the model's size)")
    def preview(body: PreviewBody) -> dict[str, str]:
        try:
            data = uploads.decode_data_url(body.image, limits.max_upload_bytes, "drawing")
            return {"preview": uploads.to_data_url(uploads.preview_png(data, size, cfg.data.max_image_pixels))}
        except uploads.UploadError as exc:
            fail(exc)

    @app.get("/api/sketchsets", summary="the stored sketch sets")
    def sketchsets() -> dict[str, Any]:
        out = []
        for name in layout.stored_names(cfg, "sketchsets"):
            try:
                m = layout.read_sketch_set(layout.sketchset_uri(cfg, name)).manifest
            except (ValueError, OSError):
                continue  # not a valid name or an unreadable set: not offered
            out.append({"name": name, "count": m.get("count"), "size": m.get("size"), "id": m.get("id")})
        return {"sketchsets": out}

    @app.post("/api/sketchsets", status_code=201, summary="save drawings as a sketch set (`sketchset create`)")
    def save_sketchset(body: SketchSetBody) -> dict[str, Any]:
        from pipeline.data.sketchsets import create_sketch_set
        from pipeline.names import validate_name

        try:
            name = validate_name(body.name, "sketch set name")
        except ValueError as exc:
            fail(exc)
        if not body.sketches:
            raise HTTPException(400, "a sketch set needs at least one sketch")
        if len(body.sketches) > limits.max_sketches:
            raise HTTPException(400, f"{len(body.sketches)} sketches: at most {limits.max_sketches} per set")
        staging = workdir()
        try:
            for i, text in enumerate(body.sketches):
                data = uploads.decode_data_url(text, limits.max_upload_bytes, f"sketch {i + 1}")
                uploads.sketch_as_trained(data, size, cfg.data.max_image_pixels, f"sketch {i + 1}")  # refuse early
                Path(staging, f"sketch-{i:03d}.png").write_bytes(data)
            with locks_guard:
                lock = set_locks.setdefault(name, threading.Lock())
            with lock:  # one writer per name; the set is published whole either way
                exists = layout.sketch_set_exists(layout.sketchset_uri(cfg, name))
                if exists and not body.replace:
                    raise HTTPException(409, f"a sketch set named {name!r} exists: choose another name or replace it")
                busy = runs.active_on(name) if exists else []
                if busy:  # a pending run would train on the new sketches, a running one be compared with them
                    raise HTTPException(409, f"runs {', '.join(busy)} train on {name!r}: wait for them or cancel "
                                             "them before replacing it")
                manifest = create_sketch_set(cfg, name, from_dir=staging)
        except uploads.UploadError as exc:
            fail(exc)
        except ValueError as exc:
            fail(exc)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        manifest.pop("from_dir", None)  # a temporary folder of the server's
        return manifest

    @app.get("/api/sketchsets/{name}/sketches.png", summary="the sketches of a set")
    def sketchset_png(name: str):
        from pipeline.data.sketchsets import load_sketch_set

        try:
            _, sketches = load_sketch_set(layout.sketchset_uri(cfg, name))
        except (ValueError, OSError) as exc:
            fail(exc, 404)
        from pipeline.data.images import grid_png

        return png(grid_png(sketches[..., None].repeat(3, -1)))

    @app.post("/api/runs", status_code=202, summary="launch a customisation (a `sketchgan train` Ray job)")
    def launch(body: LaunchBody) -> dict[str, Any]:
        t = cfg.train
        req = RunRequest(sketch_set=body.sketch_set, base=body.base,
                         iterations=t.iterations if body.iterations is None else body.iterations,
                         lambda_image=t.lambda_image if body.lambda_image is None else body.lambda_image,
                         augment=t.augment if body.augment is None else body.augment)
        try:
            return runs.launch(req)
        except (RunRequestError, ValueError) as exc:
            fail(exc, 429 if "already pending or running" in str(exc) else 400)
        except (RuntimeError, ConnectionError) as exc:  # the Jobs API refused or is unreachable
            fail(RuntimeError(f"Ray's Jobs API: {exc}"), 503)

    @app.get("/api/runs", summary="every run: status, iteration, ETA, losses, latest sample")
    def list_runs() -> dict[str, Any]:
        return {"runs": runs.list()}

    def run_or_404(run_id: str) -> dict[str, Any]:
        try:
            return runs.get(run_id)
        except (LookupError, ValueError) as exc:
            fail(exc, 404)

    @app.get("/api/runs/{run_id}", summary="one run")
    def get_run(run_id: str) -> dict[str, Any]:
        return run_or_404(run_id)

    @app.post("/api/runs/{run_id}/cancel", summary="stop a pending or running run")
    def cancel(run_id: str) -> dict[str, Any]:
        run_or_404(run_id)
        return runs.cancel(run_id)

    @app.get("/api/runs/{run_id}/sample.png", summary="the run's latest sample grid (fixed latents)")
    def run_sample(run_id: str):
        run = run_or_404(run_id)
        if run["sample_iteration"] is None:
            raise HTTPException(404, f"run {run_id} has written no samples yet")
        return png(storage.read_bytes(layout.sample_uri(run["run_uri"], run["sample_iteration"])))

    @app.get("/api/runs/{run_id}/compare.png", summary="sketches, base and customised on the same latents")
    def run_compare(run_id: str, n: int = Query(8, ge=1, le=8), seed: int = Query(0, ge=0)):
        run = run_or_404(run_id)
        if run["model"] is None:
            raise HTTPException(409, f"run {run_id} has not finished ({run['status']})")
        try:
            with picture_slot():
                return png(pictures.compare_png(cfg, run, n, seed))
        except (ValueError, OSError) as exc:
            fail(exc)

    @app.get("/api/benchmarks", summary="the benchmark's rows, every benchmark below the root")
    def benchmarks() -> dict[str, Any]:
        keys = ("model", "version", "sketch_set", "evalset", "n", "fid", "kid", "fid_base", "target_share")
        rows = []
        for name in layout.stored_names(cfg, "benchmarks"):
            uri = layout.benchmark_file(layout.benchmark_uri(cfg, name), "json")
            try:
                rows += [{"benchmark": name, **{k: r.get(k) for k in keys}} for r in storage.read_json(uri)]
            except (ValueError, OSError, AttributeError) as exc:
                log.warning("studio: skipping benchmark %s (%s)", uri, exc)
        return {"rows": rows}

    @app.get("/api/models", summary="the registry: models, versions, aliases, FID")
    def models() -> dict[str, Any]:
        from pipeline.registry.mlflow_registry import registry_table

        try:
            return {"models": registry_table(cfg), "error": None}
        except Exception as exc:  # noqa: BLE001 - an unreachable registry is shown, not a crash
            return {"models": [], "error": f"the registry cannot be read: {scrub_text(str(exc))[:500]}"}

    @app.get("/api/targets", summary="what can be generated from: the base, finished runs, registered versions")
    def targets() -> dict[str, Any]:
        out = [{"ref": "base", "label": "base"}]
        out += [{"ref": r["model"], "label": f"run {r['sketch_set']} · {r['id']}"} for r in runs.list() if r["model"]]
        for m in models()["models"]:
            out += [{"ref": v["ref"], "label": f"{m['name']} v{v['version']}" +
                     (f" ({', '.join(v['aliases'])})" if v["aliases"] else "")} for v in m["versions"]]
        return {"targets": out}

    @app.post("/api/generate", summary="samples, an interpolation strip or GANSpace edits")
    def generate(body: GenerateBody) -> dict[str, str]:
        edits = [f"{e.component}:{e.strength}:{e.first}-{e.last}" for e in body.edits]
        try:
            with picture_slot():
                data = pictures.generate_png(cfg, model_ref(body.model), body.n, body.seed, body.truncation,
                                             body.interpolate, edits, body.compare and bool(edits))
        except (ValueError, OSError, LookupError) as exc:
            fail(exc)
        return {"image": uploads.to_data_url(data)}

    @app.post("/api/blend", summary="two models of one base, interpolated in W or in weights")
    def blend(body: BlendBody) -> dict[str, str]:
        work = workdir()
        try:
            with picture_slot():
                data = pictures.blend_png(cfg, model_ref(body.a), model_ref(body.b), body.space, body.steps,
                                          body.n, body.seed, work)
        except (ValueError, OSError, LookupError) as exc:
            fail(exc)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {"image": uploads.to_data_url(data)}

    @app.post("/api/project", summary="invert a picture into a model's W+ (target, mean, reconstruction)")
    def project(body: ProjectBody) -> dict[str, Any]:
        work = workdir()
        try:
            image = uploads.decode_data_url(body.image, limits.max_upload_bytes, "picture")
            uploads.sketch_as_trained(image, size, cfg.data.max_image_pixels, "picture")  # the guarded decoder
            with picture_slot():
                data, quality, lines = pictures.project_png(cfg, image, model_ref(body.model), body.steps, work)
        except (ValueError, OSError, LookupError) as exc:
            fail(exc)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {"image": uploads.to_data_url(data), "psnr": round(quality, 2),
                "summary": [ln.split(": ", 1)[-1] for ln in lines]}

    return app
