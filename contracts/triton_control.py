"""Triton's model-control API (repository index / load / unload) behind a key only the rollout
controller holds (no torch, no I/O).

tritonserver is started with ``--grpc-restricted-protocol`` and ``--http-restricted-api`` for the
``model-repository`` protocol (:func:`server_args`): a request without the header is refused
(gRPC ``UNAVAILABLE`` "This protocol is restricted", HTTP 403). The key is ``Settings.triton_control_key``
(env ``LINEWATCH_TRITON_CONTROL_KEY``; in Kubernetes from the Secret ``linewatch-triton-control``).
Inference, metadata, model config, health and statistics stay open (the workers use those).
"""

from __future__ import annotations

CONTROL_HEADER = "linewatch-control-key"
RESTRICTED = "model-repository"
_GRPC_PREFIX = "triton-grpc-protocol-"  # tritonserver expects gRPC restricted headers with this prefix


def server_args(key: str) -> list[str]:
    """tritonserver flags restricting model control (gRPC and HTTP) to holders of ``key``."""
    if not key or any(c in key for c in " ,:=\n"):
        raise ValueError("triton control key must be non-empty, without spaces, ',', ':' or '='")
    return [f"--grpc-restricted-protocol={RESTRICTED}:{CONTROL_HEADER}={key}",
            f"--http-restricted-api={RESTRICTED}:{CONTROL_HEADER}={key}"]


def grpc_headers(key: str | None) -> dict[str, str] | None:
    """gRPC request headers for load / unload / repository index (None without a key)."""
    return {_GRPC_PREFIX + CONTROL_HEADER: key} if key else None


def http_headers(key: str | None) -> dict[str, str]:
    return {CONTROL_HEADER: key} if key else {}
