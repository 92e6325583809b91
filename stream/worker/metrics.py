"""Prometheus metrics of the stream worker (served on the Faust web port at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from contracts.envelope import is_valid_id

# every reason a frame can reach the DLQ with (docs/CONTRACTS.md "DLQ reasons"): exported at 0 from the start
DLQ_REASONS = ("missing_header", "bad_header", "unsupported_schema", "unsupported_content_type", "empty_payload",
               "unsupported_format", "undecodable_image", "too_large", "unknown_product", "unknown_task",
               "inference_error", "retry_exhausted", "internal_error")

# the ``camera`` label comes from an untrusted header: the first this many camera ids keep their own label,
# later ones count under "other", an id that is not a valid camera id under "invalid" (issue #26 item 11)
MAX_CAMERA_LABELS = 256

_LAT_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, max_camera_labels: int = MAX_CAMERA_LABELS):
        self.registry = registry or CollectorRegistry()
        self.max_camera_labels = max_camera_labels
        self._cameras: set[str] = set()
        r = self.registry
        self.frames_in = Counter("linewatch_frames_in_total", "Frames consumed from the frames topic", ["camera"], registry=r)
        self.results_out = Counter("linewatch_results_out_total", "Inspection results produced", ["model"], registry=r)
        self.defects_out = Counter("linewatch_defect_events_total", "Defect events produced", ["model"], registry=r)
        self.dlq = Counter("linewatch_dlq_total", "Frames sent to the DLQ", ["reason"], registry=r)
        for reason in DLQ_REASONS:
            self.dlq.labels(reason=reason)
        self.triton_errors = Counter("linewatch_triton_errors_total", "Triton errors", ["model", "kind"], registry=r)
        self.stage_latency = Histogram("linewatch_stage_latency_ms", "Per-stage latency (ms)", ["stage"],
                                       buckets=_LAT_BUCKETS, registry=r)
        self.batch_size = Histogram("linewatch_batch_size", "Micro-batch sizes sent to Triton", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.consumer_lag = Gauge("linewatch_consumer_lag", "Highwater - next offset, per partition", ["topic", "partition"], registry=r)
        self.breaker_open = Gauge("linewatch_triton_breaker_open",
                                  "1 while consumption is paused behind the circuit breaker: Triton unreachable, or a model the "
                                  "serving state routes to not loaded (a Triton restarted empty)",
                                  registry=r)
        self.breaker_opened = Counter("linewatch_triton_breaker_opened", "Times the Triton circuit breaker opened",
                                      registry=r)
        self.retries = Counter("linewatch_frame_retries_total",
                               "A frame's own transient inference failures (charged to its retry budget)",
                               ["model"], registry=r)
        self.inflight = Gauge("linewatch_inflight_frames", "Frames taken but not yet acknowledged", registry=r)

    def camera_label(self, camera: str | None) -> str:
        """A bounded label for ``camera`` (a header value): itself for the first ``max_camera_labels`` ids."""
        if camera is None or not is_valid_id(camera):
            return "invalid"
        if camera in self._cameras:
            return camera
        if len(self._cameras) < self.max_camera_labels:
            self._cameras.add(camera)
            return camera
        return "other"

    def count_frame_in(self, camera: str | None) -> None:
        self.frames_in.labels(camera=self.camera_label(camera)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
