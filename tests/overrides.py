"""Test shorthand for derived configs: ``--set``-style strings, as a person types them on the command line."""

from __future__ import annotations

from pipeline.config import Config, parse_override, updated


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with ``section.key=value`` overrides (values parsed as YAML), validated again."""
    changes = {}
    for text in overrides:
        path, value = parse_override(text)
        changes[".".join(path)] = value
    return updated(cfg, changes)
