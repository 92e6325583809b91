"""The worker's configuration: :class:`contracts.config.Settings` plus the values derived from them,
and its command-line flags (light: ``linewatch`` registers them without importing Faust).

No defaults live here: every tunable is a field of Settings (``LINEWATCH_*`` / the TOML file /
command-line flags through :meth:`Settings.with_overrides`); this only resolves what needs the
runtime (the cgroup's CPU and memory limits, broker URLs, Faust's credentials object).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.config import Settings


@dataclass(frozen=True)
class WorkerConfig:
    settings: Settings
    broker_urls: list[str]  # kafka://host:port per bootstrap entry (Faust's broker list)
    broker_credentials: Any = field(repr=False)  # faust SSL/SASL credentials, None for PLAINTEXT
    datadir: Path  # Faust's datadir
    decode_threads: int  # worker_decode_threads, 0 resolved to min(4, the cgroup CPU quota, usable CPUs)
    decode_budget_bytes: int  # worker_decode_budget_mb, 0 resolved to a quarter of the cgroup memory limit
    stream_buffer_max: int  # worker_stream_buffer_max, 0 resolved to max(16, 4 * batch_max)
    # original bytes a DLQ record may keep: max_frame_bytes, capped to the DLQ topic's max.message.bytes at start
    # (stream.worker.app.check_topic_limits, stream/kafka/limits.py)
    dlq_value_bytes: int

    @classmethod
    def from_settings(cls, s: Settings) -> WorkerConfig:
        """Derive the worker config. Invalid settings (e.g. SASL without a password) already failed
        when ``s`` was built; a bad CA path fails here, never falling back to plaintext."""
        from stream.kafka.clients import faust_broker_credentials
        from stream.worker import budget

        return cls(
            settings=s,
            broker_urls=[f"kafka://{h.strip()}" for h in s.kafka_bootstrap.split(",")],
            broker_credentials=faust_broker_credentials(s),
            datadir=Path(s.worker_data_dir),
            decode_threads=budget.decode_threads(s.worker_decode_threads, cpu_limit=budget.cgroup_cpu_limit(),
                                                 cpus=budget.available_cpus()),
            decode_budget_bytes=budget.decode_budget_bytes(s.worker_decode_budget_mb,
                                                           mem_limit=budget.cgroup_memory_limit()),
            stream_buffer_max=s.worker_stream_buffer_max or max(16, 4 * s.batch_max),
            dlq_value_bytes=s.max_frame_bytes,
        )


# worker flag (argparse dest) -> the setting it overrides
FLAG_SETTINGS = {
    "bootstrap": "kafka_bootstrap", "triton": "triton_grpc_url", "batch_max": "batch_max",
    "batch_within": "batch_within_s", "web_port": "worker_web_port", "app_id": "app_id",
    "datadir": "worker_data_dir", "routing": "routing", "dev_broker": "dev_broker",
    "frames_topic": "topic_frames", "results_topic": "topic_results", "defects_topic": "topic_defects",
    "dlq_topic": "topic_dlq", "fetch_max_wait_ms": "worker_fetch_max_wait_ms",
}


def add_worker_args(ap: argparse.ArgumentParser) -> None:
    """The worker's flags; each overrides one setting (FLAG_SETTINGS), none has a default of its own."""
    ap.add_argument("--bootstrap", help="Kafka bootstrap host:port (default from settings)")
    ap.add_argument("--triton", help="Triton gRPC host:port (default from settings)")
    ap.add_argument("--batch-max", type=int)
    ap.add_argument("--batch-within", type=float, help="seconds")
    ap.add_argument("--web-port", type=int)
    ap.add_argument("--app-id")
    ap.add_argument("--datadir", help="Faust data directory (settings worker_data_dir)")
    ap.add_argument("--routing", help="routing JSON file or inline JSON")
    ap.add_argument("--dev-broker", action="store_true", default=None, help="apply Tansu workarounds")
    ap.add_argument("--frames-topic")
    ap.add_argument("--results-topic")
    ap.add_argument("--defects-topic")
    ap.add_argument("--dlq-topic")
    ap.add_argument("--fetch-max-wait-ms", type=int,
                    help="consumer fetch wait cap (Tansu answers only when it expires: latency vs idle polling)")


def worker_config(settings: Settings, a: argparse.Namespace) -> WorkerConfig:
    """The worker config of ``settings`` with the flags in ``a`` applied (validated like the settings)."""
    return WorkerConfig.from_settings(settings.with_overrides(
        **{key: getattr(a, dest, None) for dest, key in FLAG_SETTINGS.items()}))
