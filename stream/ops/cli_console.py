"""``linewatch console [--host H] [--port P] [--bootstrap B] [--replay N]``: the operator web console
(stream/console/), registered into stream/ops/cli.py's parser. Runs until SIGTERM / Ctrl-C; prints one line
with its URL."""

from __future__ import annotations

import argparse
import asyncio

from contracts.cli import non_negative_int


def _cmd_console(a) -> int:
    from stream.console.server import serve
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
