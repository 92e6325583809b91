"""``linewatch console [--host H] [--port P] [--bootstrap B]``: the operator web console (registered in
stream/ops/cli.py CORE_VERBS). Runs until SIGTERM / Ctrl-C; prints one line with its URL."""

from __future__ import annotations

import argparse
import asyncio
import signal

from contracts.cli import RuntimeFailure, non_negative_int
from contracts.logs import get_logger

log = get_logger("stream.ops.console")


async def serve(settings, bootstrap: str, host: str, port: int, *, ready=None) -> None:
    """Serve until SIGTERM/SIGINT. ``ready(url)`` is called once the port is bound."""
    from aiohttp import web

    from stream.ops.console.app import build_app

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


def _cmd_console(a) -> int:
    from stream.ops.cli_worker import _bootstrap

    s = a.settings.with_overrides(console_host=a.host, console_port=a.port or None, console_replay=a.replay)
    asyncio.run(serve(s, _bootstrap(a), s.console_host, 0 if a.port == 0 else s.console_port))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("console", help="operator web console: camera wall, defects, drift, models, throughput, "
                                       "feedback (live, server-sent events)")
    p.add_argument("--host", help="address to bind (default: settings console_host, 127.0.0.1)")
    p.add_argument("--port", type=non_negative_int, help="port (default: settings console_port, 8090; 0 = any free)")
    p.add_argument("--bootstrap", help="Kafka bootstrap host:port (default from settings / a running stack)")
    p.add_argument("--replay", type=non_negative_int,
                   help="records per partition read back at start (default: settings console_replay)")
    p.set_defaults(func=_cmd_console)
