"""Who may act: every console action (a POST) needs ``Authorization: Bearer <console_token>``.

Pages and the read API need no token. With no token configured (``console_token`` unset) actions are
disabled: 403 with a message saying how to enable them. A missing or wrong token is 401. The token is
compared in constant time (:func:`hmac.compare_digest` over the UTF-8 bytes).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

DISABLED = ("actions are disabled: this console has no token configured (set LINEWATCH_CONSOLE_TOKEN "
            "and restart `linewatch console`); pages stay read-only")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int  # 200, 401 or 403
    message: str


def check_bearer(header: str | None, token: str | None) -> Decision:
    """Decide on an ``Authorization`` header value against the configured ``token``."""
    if not token:
        return Decision(False, 403, DISABLED)
    if not header:
        return Decision(False, 401, "this action needs 'Authorization: Bearer <console token>'")
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return Decision(False, 401, "this action needs 'Authorization: Bearer <console token>'")
    if not hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8")):
        return Decision(False, 401, "the console token is not valid")
    return Decision(True, 200, "ok")
