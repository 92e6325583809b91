"""Typed settings: environment (LINEWATCH_*) and an optional TOML file (LINEWATCH_CONFIG).

Defaults target the embedded local stack (`linewatch stack up`): Tansu on loopback with the
dev-broker workarounds on. Production (Apache Kafka / Strimzi) sets LINEWATCH_DEV_BROKER=false
plus the security settings; nothing else changes.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class _TomlSource(PydanticBaseSettingsSource):
    """Values from the TOML file named by LINEWATCH_CONFIG (flat keys, same names as the fields)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("LINEWATCH_CONFIG")
        if not path:
            return {}
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"LINEWATCH_CONFIG={path}: no such file")
        with p.open("rb") as f:
            data = tomllib.load(f)
        return data.get("linewatch", data)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LINEWATCH_", extra="ignore")

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    dev_broker: bool = Field(
        default=True,
        description="THE switch for every Tansu (embedded dev broker) workaround; false for Apache Kafka",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None  # client certificate (mutual TLS), PEM
    kafka_ssl_keyfile: str | None = None
    kafka_ssl_key_password: SecretStr | None = None

    # topics
    topic_frames: str = "frames"
    topic_results: str = "inspection-results"
    topic_defects: str = "defect-events"
    topic_drift: str = "drift-alerts"
    topic_model_events: str = "model-events"
    topic_dlq: str = "frames-dlq"

    # Triton
    triton_grpc_url: str = "127.0.0.1:8001"
    model_repository: Path = REPO_ROOT / "triton_repo"

    # worker
    app_id: str = "linewatch-worker"
    batch_max: int = Field(default=8, ge=1, le=256)
    batch_within_s: float = Field(default=0.02, gt=0, le=10)
    worker_web_port: int = Field(default=6066, ge=1, le=65535)
    routing: str | None = None  # JSON file path or inline JSON (stream.inference.routing)
    # bad-input bounds (contracts.spec): checked from the payload size and the image header
    # *before* decoding, so a decompression bomb is rejected without allocating it (DLQ too_large)
    max_frame_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_image_side: int = Field(default=8192, ge=1)

    # embedded stack + data
    stack_workdir: Path = REPO_ROOT / ".stack"
    data_dir: Path = REPO_ROOT.parent / "shared" / "data"
    log_level: str = "INFO"
    # supply chain: refuse to load weights that have no sha256 (sidecar or pinned digest)
    require_sha256: bool = False
    # `linewatch demo`: training steps of the short-schedule model it trains when none exists
    demo_steps: int | None = Field(default=None, ge=1)

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_port(cls, v: str) -> str:
        for hp in v.split(","):
            host, _, port = hp.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"kafka_bootstrap entry {hp!r} is not host:port")
        return v

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL") and not (
                self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(f"kafka_security_protocol={self.kafka_security_protocol} needs kafka_sasl_username "
                             "and kafka_sasl_password")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # precedence: explicit kwargs > environment > TOML file > defaults
        return (init_settings, env_settings, _TomlSource(settings_cls), file_secret_settings)

    def topics(self) -> list[str]:
        return [self.topic_frames, self.topic_results, self.topic_defects, self.topic_drift,
                self.topic_model_events, self.topic_dlq]

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict safe for logs (SecretStr renders as '**********')."""
        return {k: (str(v) if isinstance(v, SecretStr | Path) else v) for k, v in self.model_dump().items()}


def one_line_error(e: BaseException) -> str:
    """An exception as one line, without pydantic's input values (see contracts.cli.one_line)."""
    from contracts.cli import one_line

    return one_line(e)
