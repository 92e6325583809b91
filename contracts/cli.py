"""One command-line convention for every linewatch entry point (``linewatch``, ``linewatch-models``).

Exit codes: 0 success; **2** a usage or data error (bad argument, missing file or dataset, invalid
settings or input); **1** a runtime failure (a service unreachable, a timeout, a job that failed);
130 interrupted. Expected failures print one line ``<prog>: error: <message>`` on stderr, never a
traceback; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad arguments or data the user can fix: one line, exit 2."""


class RuntimeFailure(Exception):
    """The command ran and failed (a service down, a timeout, a job failed): one line, exit 1."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (no usage dump) and exits 2."""

    def error(self, message: str) -> None:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _int_at_least(v: str, low: int) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {v!r}") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"must be {'> 0' if low == 1 else f'>= {low}'}: {v}")
    return n


def positive_int(v: str) -> int:
    """argparse ``type=`` for a count that must be > 0 (a bad value is a one-line usage error)."""
    return _int_at_least(v, 1)


def non_negative_int(v: str) -> int:
    """argparse ``type=`` for a count that may be 0."""
    return _int_at_least(v, 0)


def positive_float(v: str) -> float:
    """argparse ``type=`` for seconds (or any amount) that must be > 0."""
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {v!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {v}")
    return x


def one_line(e: BaseException) -> str:
    """An exception as one line; pydantic validation errors without their input values (which may
    hold secrets such as the SASL password)."""
    if isinstance(e, ValidationError):
        parts = [f"{'.'.join(map(str, er['loc'])) or er.get('type', '')}: {er['msg']}"
                 for er in e.errors(include_input=False, include_url=False)]
        return f"invalid settings: {'; '.join(parts)}"
    return " ".join(str(e).split()) or type(e).__name__


def exit_code_of(e: BaseException, usage: tuple[type[BaseException], ...] = (),
                 runtime: tuple[type[BaseException], ...] = ()) -> int | None:
    """The convention's exit code for an expected failure, or None for a bug (re-raise it)."""
    if isinstance(e, (UsageError, ValueError, FileNotFoundError, NotADirectoryError, ValidationError, *usage)):
        return EXIT_USAGE
    if isinstance(e, (RuntimeFailure, TimeoutError, ConnectionError, *runtime)):
        return EXIT_RUNTIME
    return None


def run_command(prog: str, func: Callable[[], int | None], *, usage: Sequence[type[BaseException]] = (),
                runtime: Sequence[type[BaseException]] = ()) -> int:
    """Call ``func`` and map its expected failures to one stderr line and the convention's exit code."""
    try:
        return int(func() or 0)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as e:
        code = exit_code_of(e, tuple(usage), tuple(runtime))
        if code is None:
            raise
        sys.stderr.write(f"{prog}: error: {one_line(e)}\n")
        return code
