"""Run identity: every setting that can change a run's result, and a short id of it.

A run directory is named by its swept values (``lr=...,damping=...,seed=...``) for people; whether
an existing run *is* the requested one is decided by its identity, stored in ``summary.json``.
Policy for code versions: the git commit is recorded in every summary but is not part of the
identity (a result stays valid across commits that do not change the maths; ``kfac2l.status``
lists the commits a sweep was made with).
"""

from __future__ import annotations

import hashlib
import json


def identity_id(identity: dict) -> str:
    """A 12-hex-digit digest of the canonical JSON of ``identity``."""
    text = json.dumps(identity, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def identity_diff(old: dict | None, new: dict) -> list[str]:
    """Human-readable 'key: old -> new' lines where two identities differ."""
    a, b = _flatten(old or {}), _flatten(new)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
