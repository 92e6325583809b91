"""Strict names for everything that becomes a path or a Triton model name (no torch, no I/O).

A model name, product, task or version reaches the file system (``<store>/<model>/<version>``,
``<repository>/<name>``) and Triton's model control, so every place a name enters (model events,
manifests, exports, the rollout's repository writes, routing) checks it here: 1-128 characters of
``[A-Za-z0-9_.-]``, starting with a letter, digit or ``_``, never ``..``; so no ``/``, no leading ``.``,
no empty name. A version is an integer >= 1 (a directory name of digits only).
"""

from __future__ import annotations

import re

CANDIDATE_SUFFIX = "__candidate"  # the rollout's shadow copy of a model; never routed, never released
MAX_NAME = 128
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")  # always fullmatch: `$` matches before a final "\n"


class BadNameError(ValueError):
    """A name or version that could escape a directory or is not a Triton model name."""


def is_safe_name(value: object) -> bool:
    return isinstance(value, str) and bool(_NAME.fullmatch(value)) and ".." not in value


def check_name(value: object, what: str = "model name") -> str:
    """``value`` if it is a safe name, else :class:`BadNameError` naming ``what``."""
    if not is_safe_name(value):
        raise BadNameError(f"bad {what} {str(value)[:80]!r}: 1-{MAX_NAME} chars of [A-Za-z0-9_.-], "
                           "not starting with '.', no '..' or '/'")
    return str(value)


def check_version(value: object, what: str = "version") -> int:
    """An int >= 1 from an int or a digits-only string; else :class:`BadNameError`."""
    if isinstance(value, bool):
        raise BadNameError(f"bad {what} {value!r}: an integer >= 1")
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or value < 1:
        raise BadNameError(f"bad {what} {str(value)[:40]!r}: an integer >= 1")
    return value


def is_candidate(name: object) -> bool:
    return isinstance(name, str) and name.endswith(CANDIDATE_SUFFIX)
