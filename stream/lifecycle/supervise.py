"""Run a service's long-lived loops together (the controller, the capture service)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def run_until_stopped(stop: asyncio.Event, *loops: Coroutine[Any, Any, Any]) -> None:
    """Run ``loops`` until ``stop`` is set or one of them ends; re-raise the first one's exception.
    On the way out ``stop`` is set and every loop is cancelled and awaited (the caller then closes its
    clients)."""
    tasks = [asyncio.ensure_future(x) for x in loops]
    try:
        done, _ = await asyncio.wait([*tasks, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t in tasks and t.exception() is not None:
                raise t.exception()
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
