"""Names that become parts of paths, URIs, run and model names: refused unless plainly safe."""

from __future__ import annotations

import re

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class NameError_(ValueError):
    """A name that would escape its folder or break a URI."""


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is safe as one path component, else raise naming it and the rule."""
    if not isinstance(name, str) or not _SAFE.match(name) or ".." in name:
        raise NameError_(
            f"{what} {name!r} is not allowed: use 1-100 letters, digits, '_', '-' or '.', starting with a "
            "letter or digit, with no path separators and no '..'"
        )
    return name
