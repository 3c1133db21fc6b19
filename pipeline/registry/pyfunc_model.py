"""A customised generator as an MLflow pyfunc (images by `pipeline.models.sampling.render`, as `sketchgan generate`).

Model contract (the logged signature):

* input: a pandas DataFrame with an integer column ``seed`` (one image per row) and an optional float column
  ``truncation`` (ψ in (0, 1]; missing or NaN means 1.0, no truncation);
* params (optional): ``edits``, a string of GANSpace edits ``COMP:SCALAR:FIRST-LAST`` separated by ``;``,
  applied to every row as `sketchgan generate --edit` does, with the base's components logged with the version
  (artifact ``ganspace``; a version registered without them refuses edits, saying so);
* output: a numpy ``uint8`` array of shape ``(rows, H, W, 3)``, RGB.

An image is a pure function of (weights, seed, ψ): the latent of a row comes from its own seeded RNG, the
per-layer noise is the generator's fixed noise buffers, and the truncation centre is the mean of W over a fixed
set of latents. So the same seed gives the same image in any batch, process or machine (up to float rounding).
"""

from __future__ import annotations

import json
import math

import numpy as np

from pipeline.models.sampling import check_truncation, mean_w, render

MAX_ROWS = 4096  # per predict() call: keeps one request from exhausting memory


# -- the pyfunc -------------------------------------------------------------------------------------------
def pip_requirements() -> list[str]:
    """What the logged code imports, pinned at this environment's versions (the project itself travels as code)."""
    import importlib.metadata as md

    reqs = []
    for dist in ("torch", "numpy", "pandas", "pydantic", "PyYAML", "pyarrow", "boto3", "pillow", "mlflow"):
        try:
            reqs.append(f"{dist}=={md.version(dist).split('+')[0]}")
        except md.PackageNotFoundError:
            pass
    return reqs


def signature(size: int):
    """The logged signature: seeds (+ optional ψ) in, uint8 N x size x size x 3 images out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("long", "seed"), ColSpec("double", "truncation", required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3), name="images")])
    params = ParamSchema([ParamSpec("edits", "string", "")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example():
    import pandas as pd

    return pd.DataFrame({"seed": [0, 1], "truncation": [1.0, 0.7]})


def parse_input(model_input) -> tuple[list[int], list[float]]:
    """Seeds and ψ per row from a DataFrame (or a mapping / list of rows), refusing bad values by column."""
    import pandas as pd

    df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if "seed" not in df.columns:
        raise ValueError(f"model input: a column 'seed' is required (got columns {list(df.columns)})")
    if len(df) > MAX_ROWS:
        raise ValueError(f"model input: at most {MAX_ROWS} rows per call, got {len(df)}")
    seeds = []
    for i, s in enumerate(df["seed"].tolist()):
        if isinstance(s, float) and s.is_integer():
            s = int(s)
        if isinstance(s, bool) or not isinstance(s, int | np.integer) or not 0 <= int(s) < 2**63:
            raise ValueError(f"model input row {i}: seed must be an integer in [0, 2**63), got {s!r}")
        seeds.append(int(s))
    psi = [1.0] * len(seeds)
    if "truncation" in df.columns:
        for i, p in enumerate(df["truncation"].tolist()):
            if p is None or (isinstance(p, float) and math.isnan(p)):
                continue
            psi[i] = check_truncation(p, f"model input row {i}")
    return seeds, psi


try:
    import pandas as pd  # MLflow's dependency; predict's type hint (a DataFrame: MLflow infers no schema from it)
    from mlflow.pyfunc import PythonModel as _PythonModel
except ImportError:  # the sampling helpers above work without MLflow
    _PythonModel = object


class SketchGANModel(_PythonModel):
    """MLflow pyfunc: artifacts ``generator`` (state dict) and ``metadata`` (run metadata with ``arch``)."""

    def load_context(self, context) -> None:
        from pipeline.models import factory
        from pipeline.models.checkpoints import load_into, load_state_dict

        with open(context.artifacts["metadata"]) as f:
            self.metadata = json.load(f)
        arch = self.metadata.get("arch")
        if not isinstance(arch, dict):
            raise ValueError("model artifact 'metadata': no generator architecture ('arch')")
        self.device = factory.device_default()
        G = factory.build_generator(arch)
        load_into(G, load_state_dict(context.artifacts["generator"]), source="model artifact generator")
        self.G = G.to(self.device).eval().requires_grad_(False)
        self._centre = None
        self.components = None
        if context.artifacts.get("ganspace"):
            from pipeline.edit import ganspace

            self.components = ganspace.load(context.artifacts["ganspace"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        seeds, psi = parse_input(model_input)
        if self._centre is None and any(p < 1 for p in psi):
            self._centre = mean_w(self.G, self.device)
        edits = [e for e in str((params or {}).get("edits") or "").split(";") if e.strip()]
        if not edits:
            return render(self.G, seeds, psi, self.device, self._centre)
        from pipeline.edit import ganspace

        if self.components is None:
            raise ValueError("params 'edits': this version was registered without its base's GANSpace components "
                             "(run `sketchgan ganspace compute --base BASE`, then register again)")
        return ganspace.render_edited(self.G, seeds, psi, [ganspace.parse_edit(e) for e in edits],
                                      self.components, self.device, self._centre)
