"""The console's server: the web app (app.py) on one port until SIGTERM / Ctrl-C, one line with its URL.

The ``linewatch console`` verb that starts it is stream/ops/cli_console.py (the CLI resolves the bootstrap)."""

from __future__ import annotations

import asyncio
import signal

from contracts.cli import RuntimeFailure
from contracts.logs import get_logger

log = get_logger("stream.console")


async def serve(settings, bootstrap: str, host: str, port: int, *, ready=None) -> None:
    """Serve until SIGTERM/SIGINT. ``ready(url)`` is called once the port is bound."""
    from aiohttp import web

    from stream.console.app import build_app

    app = build_app(settings, bootstrap)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=3.0)
    await runner.setup()  # starts the Kafka tails (the serving state is read to its end first)
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise RuntimeFailure(f"console cannot listen on {host}:{port}: {e.strerror or e}") from None
        bound = runner.addresses[0][1] if runner.addresses else port
        url = f"http://{host}:{bound}/"
        log.info("console_listening", url=url, bootstrap=bootstrap, actions_enabled=settings.console_token is not None)
        print(f"linewatch console: {url}" + ("" if settings.console_token is not None else
                                              "  (read-only: no LINEWATCH_CONSOLE_TOKEN)"), flush=True)
        if ready is not None:
            ready(url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("console_stopping")
    finally:
        await runner.cleanup()
