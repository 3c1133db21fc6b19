"""The building blocks of every config section (`pipeline.config`, `pipeline.studio.settings`): strict sections
and locations (local paths made absolute, URIs kept)."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


def absolute_location(v: str | None) -> str | None:
    """A local path made absolute (URIs unchanged): Ray workers run elsewhere, relative means the caller's."""
    if not v or "://" in v:
        return v
    return os.path.abspath(os.path.expanduser(v))


Location = Annotated[str, AfterValidator(absolute_location)]  # a local path or URI, e.g. s3://bucket/key


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
