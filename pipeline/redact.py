"""Masking secrets in anything that leaves the process (MLflow params and tags, logs, printed lines).

Config keys that name credentials are masked, userinfo in URIs is masked, and the values of credential
environment variables are masked wherever they appear.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "***"

_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|api[_-]?key|access[_-]?key|private[_-]?key|"
                         r"auth", re.IGNORECASE)
_URI_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "DATABRICKS_TOKEN", "RAY_AUTH_TOKEN",
               "HF_TOKEN", "GITHUB_TOKEN", "SKETCHGAN_STUDIO_TOKEN")


def _secret_values() -> list[str]:
    return [v for v in (os.environ.get(k) for k in _SECRET_ENV) if v and len(v) >= 4]


def scrub_text(text: str) -> str:
    """Mask URI userinfo and the values of credential environment variables in a string."""
    out = _URI_USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", text)
    for value in _secret_values():
        out = out.replace(value, REDACTED)
    return out


def scrub(obj: Any) -> Any:
    """A copy of ``obj`` with credential-named keys masked and secrets masked in every string."""
    if isinstance(obj, dict):
        return {k: (REDACTED if _SECRET_KEY.search(str(k)) and v not in (None, "") else scrub(v))
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [scrub(v) for v in obj]
    if isinstance(obj, str):
        return scrub_text(obj)
    return obj
