"""Version numbers compared as numbers: '10.16.1.11' == '10.16.1.11.post1' and '10.9' < '10.15'."""

from __future__ import annotations

import re

from arexport.errors import ArexportError


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: its leading dot-separated integers
    ('10.16.1.11.post1' -> (10, 16, 1, 11), '1.27.0+cu13' -> (1, 27, 0)); refuses a string with none."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(version))
    if not m:
        raise ArexportError(f"not a version number: {version!r}")
    return tuple(int(x) for x in m.group(1).split("."))


def same_release(a: str, b: str) -> bool:
    """Whether two version strings name the same release (trailing zero components, post and local
    labels ignored: '10.16.1' == '10.16.1.0' == '10.16.1.post1')."""
    ra, rb = list(release(a)), list(release(b))
    while ra and ra[-1] == 0:
        ra.pop()
    while rb and rb[-1] == 0:
        rb.pop()
    return ra == rb
