"""Typed settings, the ONE config root: environment (LINEWATCH_*) and an optional TOML file (LINEWATCH_CONFIG).

Every entry point builds :class:`Settings` once (``linewatch`` in stream/ops/cli.py, ``python -m
stream.worker.app``) and passes it down; nothing else reads the environment. Nested groups use a
double underscore: ``LINEWATCH_DRIFT__WINDOW=32`` sets ``settings.drift.window`` (TOML:
``[linewatch.drift] window = 32``). A ``LINEWATCH_*`` variable that names no setting is an error
(:class:`UnknownSettingError`), never silently ignored.

Defaults target the embedded local stack (`linewatch stack up`): Tansu on loopback with the
dev-broker workarounds on. Production (Apache Kafka / Strimzi) sets LINEWATCH_DEV_BROKER=false
plus the security settings; nothing else changes.
"""

from __future__ import annotations

import functools
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "LINEWATCH_"
CONFIG_ENV = "LINEWATCH_CONFIG"  # the TOML file; the one LINEWATCH_* variable that is not a field


class UnknownSettingError(ValueError):
    """A LINEWATCH_* environment variable that names no setting (a typo or a stale manifest)."""


class _TomlSource(PydanticBaseSettingsSource):
    """Values from the TOML file named by LINEWATCH_CONFIG (flat keys, same names as the fields)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            return {}
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"{CONFIG_ENV}={path}: no such file")
        with p.open("rb") as f:
            data = tomllib.load(f)
        return data.get("linewatch", data)


class _RejectUnknownEnv(PydanticBaseSettingsSource):
    """Contributes nothing; raises on a LINEWATCH_* variable that is no field (nor a nested one)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        known = env_names(self.settings_cls)
        for name in sorted(os.environ):
            if name.upper().startswith(ENV_PREFIX) and name.upper() not in known:
                raise UnknownSettingError(f"unknown setting {name} in the environment (no such field in "
                                          "contracts.config.Settings; nested fields are LINEWATCH_<GROUP>__<FIELD>)")
        return {}


def env_names(settings_cls: type[BaseSettings]) -> set[str]:
    """Every LINEWATCH_* name the settings read: fields, nested fields (``__``) and LINEWATCH_CONFIG."""
    names = {CONFIG_ENV}
    for name, f in settings_cls.model_fields.items():
        names.add(f"{ENV_PREFIX}{name}".upper())
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            names |= {f"{ENV_PREFIX}{name}__{sub}".upper() for sub in f.annotation.model_fields}
    return names


class DriftSettings(BaseModel):
    """Per-camera score drift on the worker (stream/lifecycle/drift.py); alerts go to ``topic_drift``."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    window: int = Field(default=64, ge=8)  # frames per sliding window
    check_every: int = Field(default=16, ge=1)  # evaluate once every N new frames
    min_interval_s: float = Field(default=60.0, ge=0)  # per key: at most one alert this often
    # a model without calibration scores in its spec: its first `warmup` scores are the reference
    warmup: int = Field(default=128, ge=10)  # the drift reference needs >= 10 scores (stream/lifecycle/drift.py)
    retrain_on_ood: bool = True  # a route_ood alert also publishes `retrain_requested` on model-events
    max_tracks: int = Field(default=20000, ge=1)  # (camera, model version/task) windows kept; least recent dropped


class RolloutSettings(BaseModel):
    """The rollout controller (stream/lifecycle/controller.py) and its health policy (policy.py)."""

    model_config = ConfigDict(extra="forbid")
    shadow_frames: int = Field(default=32, ge=1)  # frames the candidate scores before a decision
    min_frames: int = Field(default=16, ge=1)  # fewer at the timeout -> roll back (not enough evidence)
    shadow_timeout_s: float = Field(default=120.0, gt=0)
    # a candidate of a served product on an idle line (no live frame) waits in shadow ("waiting for traffic") up
    # to this long, then is judged on what it has (rolled back under min_frames); idle is not failure
    traffic_deadline_s: float = Field(default=3600.0, gt=0)
    load_timeout_s: float = Field(default=180.0, gt=0)
    max_error_rate: float = Field(default=0.0, ge=0, le=1)  # any inference error -> roll back
    max_good_flag_rate: float = Field(default=0.2, ge=0, le=1)  # good-looking frames the candidate flags
    group: str = "linewatch-controller"  # consumer group of the controller service (`linewatch controller`)
    reconcile_s: float = Field(default=5.0, gt=0)  # serving state -> every Triton replica, this often
    shadow_sample_every: int = Field(default=1, ge=1)  # the controller shadows every n-th live frame of a product
    # an error escaping a rollout re-runs its event this many times, then the event is refused (controller_error)
    max_attempts: int = Field(default=5, ge=1)
    # the controller's consumer leaves its group past this without a poll; it polls (paused) during a rollout
    max_poll_interval_s: float = Field(default=300.0, gt=0)
    # the one-active-controller lease (stream/lifecycle/lease.py); None: <model repository>/.linewatch-controller.lease
    lease_path: str | None = None


class ServingSettings(BaseModel):
    """Where Triton runs the detectors: written into each model's config.pbtxt ``instance_group`` when the
    controller materialises a version (stream/lifecycle/repository.py), read back by the Python-backend
    model from ``model_instance_kind``/``model_instance_device_id`` (models/serving_device.py)."""

    model_config = ConfigDict(extra="forbid")
    device: Literal["cpu", "gpu"] = "cpu"  # the prod overlay sets gpu (the Triton pods reserve nvidia.com/gpu)
    instances: int = Field(default=1, ge=1, le=16)  # model instances per GPU (gpu) or in all (cpu)
    gpus: list[int] = Field(default_factory=list)  # GPU ids the instances go on; empty: every GPU Triton sees
    # EfficientAD on the GPU: "onnxruntime" = model.onnx on Triton's onnxruntime backend with the TensorRT
    # accelerator (FP16 when ``fp16``, engines cached under ``trt_cache_dir``, a writable volume); "python" =
    # the TorchScript model.pt in the Python backend (the only choice on the CPU stack)
    efficientad_backend: Literal["python", "onnxruntime"] = "python"
    fp16: bool = True  # GPU only: TensorRT FP16 (EfficientAD), FP16 backbone + FP32 flow (MoLE-Flow)
    trt_cache_dir: str = "/trt-cache"

    @model_validator(mode="after")
    def _onnx_needs_gpu(self) -> ServingSettings:
        if self.efficientad_backend == "onnxruntime" and self.device != "gpu":
            raise ValueError("serving.efficientad_backend=onnxruntime is the GPU path; the CPU stack serves python")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

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
    # operators' commands (``rollback_requested``): the controller obeys a rollback only from this topic, which
    # only the operator's and the console's users may write; the trainer, which writes model-events, cannot
    topic_model_commands: str = "model-commands"
    # the workers' retrain_requested (route-OOD drift): read by the capture service, never by the controller, so
    # a worker (it decodes untrusted images) needs no write on model-events, whose commands the controller obeys
    topic_retrain_requests: str = "retrain-requests"
    topic_dlq: str = "frames-dlq"
    topic_serving_state: str = "serving-state"  # compacted; written by the controller only
    topic_drift_state: str = "drift-state"  # compacted; each worker's drift windows per camera (survive restarts)

    # Triton
    triton_grpc_url: str = "127.0.0.1:8001"
    model_repository: Path = REPO_ROOT / "triton_repo"
    # key for Triton's restricted model-control API (load/unload/index; contracts/triton_control.py): only
    # the rollout controller holds it. The embedded stack generates one when unset.
    triton_control_key: SecretStr | None = None
    # the Triton replicas the controller loads on: a comma list of gRPC host:port, or a headless Service
    # host:port resolved to every address on each reconcile pass (wins when set); empty: triton_grpc_url
    controller_triton_urls: str = ""
    controller_triton_service: str = ""

    # worker
    app_id: str = "linewatch-worker"
    batch_max: int = Field(default=8, ge=1, le=256)
    batch_within_s: float = Field(default=0.02, gt=0, le=10)
    worker_web_port: int = Field(default=6066, ge=1, le=65535)
    worker_web_host: str = "127.0.0.1"  # /metrics, /healthz, /rollout (a pod binds 0.0.0.0 for its probes)
    worker_data_dir: Path = REPO_ROOT / ".stack" / "faust"  # Faust's datadir (tables, offsets cache)
    topic_partitions: int = Field(default=1, ge=1)  # partitions of the topics Faust creates
    # Faust hard-codes fetch_max_wait_ms=1500; Tansu answers a fetch only when the wait expires
    worker_fetch_max_wait_ms: int = Field(default=50, ge=0)  # 0 = leave Faust's value
    # a model missing from Triton this long -> its frames go to the DLQ (unknown_product)
    worker_transient_grace_s: float = Field(default=120.0, ge=0)
    # retry safety (stream/worker/breaker.py): a frame whose own request fails transiently more than this
    # many times while Triton answers (live, model READY) goes to the DLQ (retry_exhausted)
    worker_retry_budget: int = Field(default=6, ge=0)
    # Triton unreachable -> the circuit breaker opens: consumption pauses, liveness probed with capped backoff
    worker_breaker_backoff_s: float = Field(default=0.5, gt=0)
    worker_breaker_backoff_max_s: float = Field(default=10.0, gt=0)
    # frames buffered per partition ahead of the agent (Faust default 4096: a stalled Triton let a 530 KB-frame
    # backlog grow the worker by ~22 MB/s of lag); past it Faust stops fetching and the backlog stays in Kafka
    worker_stream_buffer_max: int = Field(default=0, ge=0)  # 0 = max(16, 4 * batch_max)
    worker_decode_threads: int = Field(default=0, ge=0)  # 0 = min(4, the cgroup CPU quota, usable CPUs)
    heatmap_size: int = Field(default=64, ge=8, le=1024)  # defect-event heat map side (pixels)
    routing: str | None = None  # JSON file path or inline JSON (stream.inference.routing)
    # bad-input bounds (contracts.spec): checked from the payload size and the image header
    # *before* decoding, so a decompression bomb is rejected without allocating it (DLQ too_large)
    max_frame_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_image_side: int = Field(default=8192, ge=1)
    # decode bombs under the cap (contracts.image, stream/worker/budget.py). The worker's pixel cap per frame is
    # min(max_image_pixels, this x its model's input H x W): 576 = 24 x 24, a 256x256 model takes up to 37.7 MP,
    # a 128x128 one 9.4 MP; 0 = max_image_pixels alone
    max_image_pixels_per_input: int = Field(default=576, ge=0)
    # concurrent decodes hold their estimated peak bytes within this budget (MiB); one that could never fit
    # is DLQ'd too_large. 0 = a quarter of the cgroup memory limit (memory.max), else 1024 MiB.
    # (worker_decode_threads 0 resolves from the cgroup CPU quota, cpu.max, not the node's CPU count)
    worker_decode_budget_mb: int = Field(default=0, ge=0)
    jpeg_reduced_decode: bool = True  # decode a large JPEG at 1/2..1/8 scale when still >= the model input
    # ack safety (stream/worker/app.py, issue #15 item 1): how long the worker waits for Triton at start before it
    # opens the circuit breaker (consumption paused, capped-backoff probes) instead of failing a batch
    worker_ready_wait_s: float = Field(default=120.0, gt=0)
    # SIGTERM / a fatal error: a graceful stop that takes longer (e.g. the broker unreachable, so no commit or
    # LeaveGroup can finish) ends the process; nothing unpublished was acked, so its frames are redelivered
    worker_shutdown_timeout_s: float = Field(default=15.0, gt=0)
    # producer errors (stream/kafka/produce.py): retriable ones re-send only the unacknowledged records,
    # with capped exponential backoff; fatal ones stop the worker without acking
    worker_produce_backoff_s: float = Field(default=0.2, gt=0)
    worker_produce_backoff_max_s: float = Field(default=10.0, gt=0)
    # max.message.bytes assumed for a topic that reports none (Tansu; stream/kafka/limits.py); None = no limit known
    kafka_max_message_bytes: int | None = Field(default=None, ge=1024)

    # embedded stack + data
    stack_workdir: Path = REPO_ROOT / ".stack"
    data_dir: Path = REPO_ROOT.parent / "shared" / "data"
    log_level: str = "INFO"
    # supply chain: refuse to load weights that have no sha256 (sidecar or pinned digest)
    require_sha256: bool = False
    # `linewatch demo`: training steps of the short-schedule model it trains when none exists
    demo_steps: int | None = Field(default=None, ge=1)

    # console (issue 18: `linewatch console`; fields of this block owned by the console)
    console_host: str = "127.0.0.1"
    console_port: int = Field(default=8090, ge=1, le=65535)
    console_token: SecretStr | None = None  # every action needs it; without it the console is read-only
    # operator verdicts on defect events (confirm / false alarm), written by the console (stream/console)
    topic_feedback: str = "inspection-feedback"
    console_replay: int = Field(default=200, ge=0, le=100_000)  # records per partition replayed at start
    console_max_defects: int = Field(default=500, ge=1, le=100_000)  # defect events kept (ring buffer)
    console_frame_buffer_mb: int = Field(default=32, ge=0, le=4096)  # recent frames kept for thumbnails; 0 = none
    # the console's Onboard action runs `linewatch onboard --product P --wait` as a child process: "local"
    # trains in that process, "k8s" adds --k8s (the training runs as a Job), "off" refuses the action
    console_onboard_runner: Literal["off", "local", "k8s"] = "local"
    console_onboard_args: list[str] = []  # extra training-job arguments (after `--`), e.g. a shorter schedule

    # camera sources + onboarding (issue 18: `linewatch camera`, the capture service, `linewatch onboard`)
    capture_dir: Path = REPO_ROOT / ".stack" / "captures"  # captured frames (the model store's datasets in k8s)
    # `linewatch camera`: producer sends awaiting their ack at most (a full window drops the frame, never queues)
    camera_max_inflight: int = Field(default=8, ge=1, le=1024)
    camera_reconnect_backoff_s: float = Field(default=0.5, gt=0)  # a stream source's read failure: capped backoff
    camera_reconnect_backoff_max_s: float = Field(default=30.0, gt=0)
    # capture progress + onboarding steps (JSON, stream/lifecycle/onboarding.py), and the console's capture_select
    topic_onboarding: str = "onboarding-events"
    capture_group: str = "linewatch-capture"  # consumer group of the capture service (`linewatch capture`)
    capture_policy: Literal["every_n", "select"] = "every_n"  # select: only operator-selected frame ids
    capture_every_n: int = Field(default=1, ge=1)  # every_n: one of every n candidate frames per product
    capture_max_per_product: int = Field(default=500, ge=1)  # stop capturing a product at this many images
    capture_arm_s: float = Field(default=600.0, gt=0)  # retrain_requested: capture that product's live frames this long
    capture_buffer: int = Field(default=256, ge=0, le=100_000)  # recent candidates kept for a later selection
    capture_buffer_bytes: int = Field(default=64 * 1024 * 1024, ge=0)  # ... and their bytes at most
    # quotas (stream/lifecycle/capture.py): product names come from untrusted frame headers and the volume is
    # shared with the model store; past a quota a candidate is refused with a capture_refused event
    capture_max_products: int = Field(default=64, ge=1)  # product dirs under capture_dir
    capture_max_bytes: int = Field(default=2 * 1024 ** 3, ge=1024)  # bytes of captured images under capture_dir
    # `linewatch onboard`: where the training job exports (k8s: /models/store) and the multi-task training
    # stores live (<dir>/<detector>: frozen base + adapters; k8s: /models/training)
    onboard_model_store: Path = REPO_ROOT / ".stack" / "store"
    onboard_training_store: Path = REPO_ROOT / ".stack" / "training"
    onboard_min_images: int = Field(default=20, ge=4)  # the training job needs >= 4 (it holds some out)

    drift: DriftSettings = DriftSettings()
    rollout: RolloutSettings = RolloutSettings()
    serving: ServingSettings = ServingSettings()
    # training (distillation, EfficientAD, MoLE-Flow): "auto" = CUDA when torch sees it (mixed precision there)
    train_device: Literal["auto", "cpu", "cuda"] = "auto"
    # the decision threshold of every trained model targets this false-alarm rate on good parts, estimated on
    # held-out good images (models/operating_point.py); operator feedback refines it through a release
    target_false_alarm_rate: float = Field(default=0.01, gt=0.0, lt=0.5)
    # the training job's wall budget on a CPU (the detector's full recipe, fewer steps/epochs to fit; a GPU runs
    # the full schedule): ~300 images in 10 min on a small CPU node
    train_budget_cpu_s: float = Field(default=600.0, gt=0.0)

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
        # precedence: explicit kwargs > environment > TOML file > defaults; unknown LINEWATCH_* names fail first
        return (_RejectUnknownEnv(settings_cls), init_settings, env_settings, _TomlSource(settings_cls),
                file_secret_settings)

    def topics(self) -> list[str]:
        return [self.topic_frames, self.topic_results, self.topic_defects, self.topic_drift,
                self.topic_model_events, self.topic_model_commands, self.topic_retrain_requests, self.topic_dlq, self.topic_serving_state, self.topic_drift_state,
                self.topic_feedback, self.topic_onboarding]

    def with_overrides(self, **overrides: Any) -> Settings:
        """A validated copy with the non-None ``overrides`` (command-line flags) applied; the environment
        is not read again."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return self if not given else type(self).model_validate({**self.model_dump(), **given})

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict safe for logs (SecretStr renders as '**********')."""
        return {k: (str(v) if isinstance(v, SecretStr | Path) else v) for k, v in self.model_dump().items()}


@functools.cache
def process_settings() -> Settings:
    """Settings for code called without them by a caller that is no linewatch entry point (a test, a
    benchmark): built once per process from the environment. Entry points build their own and pass
    them down; stream/ code never calls this except as the fallback of an optional ``settings``."""
    return Settings()
