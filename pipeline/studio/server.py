"""`sketchgan studio`: serve the app with uvicorn, on loopback unless a token is set."""

from __future__ import annotations

import ipaddress
import os

from pipeline.config import Config
from pipeline.studio.settings import TOKEN_ENV


class StudioSecurityError(ValueError):
    """A setting that would expose the studio without protection."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def studio_token(host: str) -> str | None:
    """The token requests must carry: SKETCHGAN_STUDIO_TOKEN when set; required for any non-loopback address."""
    token = os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(host):
        raise StudioSecurityError(f"refusing to listen on {host} without a token: set {TOKEN_ENV} (e.g. "
                                  f"`export {TOKEN_ENV}=$(python -c 'import secrets; print(secrets.token_hex(32))')`)"
                                  ", or bind 127.0.0.1")
    if token is not None and len(token) < 16:
        raise StudioSecurityError(f"{TOKEN_ENV} is too short: use at least 16 characters")
    return token


def allowed_hosts(host: str) -> list[str] | None:
    """Host headers a studio on ``host`` answers: loopback names on loopback (no DNS rebinding), any when it
    listens on every address (the token protects it then)."""
    if host in ("0.0.0.0", "::", "[::]"):
        return None
    return sorted({"127.0.0.1", "localhost", "[::1]", host if ":" not in host else f"[{host.strip('[]')}]"})


def prepare_registry(cfg: Config) -> None:
    """Create the tracking store and experiment once, now: runs finishing together would otherwise race to
    create an embedded store (its schema migration is not safe for two processes at once)."""
    import logging

    from pipeline.redact import scrub_text
    from pipeline.registry import tracking

    try:
        tracking.ensure_experiment(tracking.client(cfg), cfg)
    except Exception as exc:  # noqa: BLE001 - the studio still works; runs say when they cannot register
        logging.getLogger("sketchgan.studio").warning("MLflow is not reachable yet (%s)", scrub_text(str(exc)))


def serve(cfg: Config) -> None:
    import uvicorn

    from pipeline.studio.app import create_app
    from pipeline.studio.runs import Runs

    host, port = cfg.studio.host, cfg.studio.port
    token = studio_token(host)
    os.environ.pop(TOKEN_ENV, None)  # not inherited by Ray's processes and the jobs they start
    runs = Runs(cfg)
    runs.client()  # Ray first, from the main thread (its signal handlers), before the page can ask for runs
    prepare_registry(cfg)
    app = create_app(cfg, token, runs, allowed_hosts=allowed_hosts(host))
    shown = f"[{host}]" if ":" in host else host
    # the token is the user's own secret: the address says where to put it, never prints it
    suffix = f"/?token=${TOKEN_ENV}" if token else "/"
    print(f"studio: http://{shown}:{port}{suffix} (Ctrl-C stops it; runs go to "
          f"{cfg.studio.ray_address or 'a local Ray instance'})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
