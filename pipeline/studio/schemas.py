"""The JSON bodies the studio's API accepts (validated by FastAPI; limits here are the API's own)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class PreviewBody(BaseModel):
    image: str = Field(description="the drawing as a data URL (data:image/png;base64,...)")


class SketchSetBody(BaseModel):
    name: str = Field(description="the set's name: letters, digits, '_', '-', '.'")
    sketches: list[str] = Field(description="drawings as data URLs, as drawn or uploaded")
    replace: bool = Field(False, description="replace a set of the same name")


class LaunchBody(BaseModel):
    sketch_set: str
    base: str = "base"
    iterations: int | None = None
    lambda_image: float | None = Field(None, ge=0)
    augment: str | None = None


class Edit(BaseModel):
    component: int = Field(ge=0)
    strength: float
    first: int = Field(0, ge=0)
    last: int = Field(ge=0)


class GenerateBody(BaseModel):
    model: str
    n: int = Field(8, ge=1, le=64)
    seed: int = Field(0, ge=0)
    truncation: float = Field(1.0, gt=0, le=1)
    interpolate: bool = False
    edits: list[Edit] = Field(default_factory=list)
    compare: bool = False


class BlendBody(BaseModel):
    a: str
    b: str
    space: str = "weights"
    steps: int = Field(5, ge=2, le=16)
    n: int = Field(4, ge=1, le=16)
    seed: int = Field(0, ge=0)


class ProjectBody(BaseModel):
    image: str
    model: str = "base"
    steps: int = Field(200, ge=1, le=2000)
