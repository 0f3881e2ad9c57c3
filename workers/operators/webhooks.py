"""`send_webhook`: a signed JSON POST carrying the call's idempotency key."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from workers.errors import TransientError
from workers.operators.context import OperatorContext, OperatorError, param
from workers.operators.gate import gate
from workers.settings import get_settings


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Fleet-Signature header: `t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def send_webhook(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    """POST JSON `payload` to `url`, signed, with the call's idempotency key.

    2xx succeeds; timeouts, connection errors, 429 and 5xx are transient (retried
    with backoff and jitter by the actions task); other statuses fail the node.
    `to_user: true` marks a webhook that delivers a message to the execution's user
    (a chat app, an SMS provider's API): it passes the send gateway on channel
    `webhook`, as `send_message` does.
    """
    url = param(params, "url", str)
    if not url.startswith(("http://", "https://")):
        raise OperatorError(f"url must be http(s): {url!r}")
    payload = param(params, "payload", (dict, list), {})
    decision = None
    if param(params, "to_user", bool, False):  # a message to the user: the gateway decides
        decision = gate(ctx, "webhook", None, param(params, "transactional", bool, False))
        if decision.outcome != "sent":
            return decision.as_result()
    settings = get_settings()
    body = json.dumps(payload, default=str, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "Idempotency-Key": ctx.key,
               "User-Agent": "lifecycle-fleet"}
    if settings.webhook_secret:
        headers["X-Fleet-Signature"] = sign(settings.webhook_secret, int(time.time()), body)
    response = httpx.post(url, content=body, headers=headers, timeout=settings.webhook_timeout)
    if response.status_code == 429 or response.status_code >= 500:
        raise TransientError(f"webhook {url} answered {response.status_code}")
    if response.status_code >= 300:
        raise OperatorError(f"webhook {url} answered {response.status_code}")
    return {"status": response.status_code, **(decision.as_result() if decision else {})}
