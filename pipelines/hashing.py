"""Content-addressed names: the same inputs give the same name, on any machine and in any process.

A name is the sha256 of the inputs as canonical JSON, in hex, cut to a length that suits where it is shown
(a dataset version, a work folder, a job). Canonical here is what the names were first computed with, so that
existing versions, work folders and jobs keep their names: `json.dumps` with sorted keys, its default separators
(", " and ": ") and ASCII escapes, and `str()` for values JSON has no type for (a Path, say). For values that are
all JSON types `str()` is never called, so inputs hashed before without it get the same name.

A leaf: it imports nothing of the project.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def content_hash(obj: Any, length: int) -> str:
    """The first `length` hex digits of the sha256 of `obj` as canonical JSON (see the module docstring)."""
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
