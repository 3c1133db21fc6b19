"""The ``studio`` config section (kept beside the studio; `pipeline.config` includes it)."""

from __future__ import annotations

from pydantic import Field

from pipeline.config_types import Location, Section

TOKEN_ENV = "SKETCHGAN_STUDIO_TOKEN"  # the studio's token comes from the environment, never from a file


class StudioConfig(Section):
    """`sketchgan studio`: where it listens, where its runs go, what it accepts."""

    host: str = "127.0.0.1"  # any other address requires SKETCHGAN_STUDIO_TOKEN
    port: int = Field(8765, ge=1, le=65535)
    # a cluster's Jobs API (http://HEAD:8265, token auth from RAY_AUTH_* as for `ray job submit`); default: a
    # local Ray instance the studio starts
    ray_address: str | None = None
    runtime_env: Location | None = None  # runtime env YAML for jobs on a cluster (e.g. infra/runtime_env.yaml)
    max_upload_bytes: int = Field(4_000_000, ge=1024)  # per drawing or photo, before decoding
    max_sketches: int = Field(64, ge=1)  # per sketch set
    max_active_runs: int = Field(4, ge=1)  # pending or running at once
    run_cpus: float = Field(1.0, gt=0)  # CPUs of each run's training worker (train.cpus_per_worker)
