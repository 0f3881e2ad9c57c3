"""`send_webhook`: a signed JSON POST carrying the call's idempotency key.

The signing key is the workspace's stored `webhook_signing_key` secret (falling back to
FLEET_WEBHOOK_SECRET), and `auth_secret` names a stored secret sent as a bearer token:
both are decrypted here, in the actions worker, just before the request, and stay
`SecretStr` (a masked repr) until the bytes are signed or the header is set, so no
parameter, variable, result, log line or error message carries them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Generator
from typing import Any

import httpx
from pydantic import SecretStr

from db import tenancy
from workers.errors import TransientError
from workers.operators.context import OperatorContext, OperatorError, param
from workers.operators.gate import gate
from workers.secrets import store as secrets
from workers.settings import get_settings


def sign(secret: str | SecretStr, timestamp: int, body: bytes) -> str:
    """The X-Fleet-Signature header: `t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`."""
    key = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    digest = hmac.new(key.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def signing_key(ctx: OperatorContext) -> SecretStr | None:
    """The workspace's stored `webhook_signing_key`, else FLEET_WEBHOOK_SECRET; None: unsigned."""
    stored = secrets.get(ctx.session, tenancy.current_workspace(), secrets.WEBHOOK_SIGNING_KEY)
    if stored is not None:
        return stored
    fallback = get_settings().webhook_secret
    return SecretStr(fallback) if fallback else None


class BearerSecret(httpx.Auth):
    """`Authorization: Bearer <stored secret>`, set on the request as httpx sends it."""

    def __init__(self, token: SecretStr) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        yield request


def _bearer(ctx: OperatorContext, name: str) -> BearerSecret:
    try:
        secrets.check_name(name)
    except secrets.InvalidSecret as exc:
        raise OperatorError(f"auth_secret: {exc}") from None
    token = secrets.get(ctx.session, tenancy.current_workspace(), name)
    if token is None:
        raise OperatorError(f"auth_secret {name!r} is not set in this execution's workspace "
                            f"(fleet --workspace NAME secret set {name})")
    return BearerSecret(token)


def send_webhook(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    """POST JSON `payload` to `url`, signed, with the call's idempotency key.

    2xx succeeds; timeouts, connection errors, 429 and 5xx are transient (retried
    with backoff and jitter by the actions task); other statuses fail the node.
    `to_user: true` marks a webhook that delivers a message to the execution's user
    (a chat app, an SMS provider's API): it passes the send gateway on channel
    `webhook`, as `send_message` does. `auth_secret: NAME` sends the workspace's stored
    secret NAME (`fleet secret set NAME`) as `Authorization: Bearer` (a provider's token).
    Executions belong to the default workspace until workspaces come (issue 19, item 1).
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
    auth_secret = param(params, "auth_secret", str, None)
    settings = get_settings()
    body = json.dumps(payload, default=str, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "Idempotency-Key": ctx.key,
               "User-Agent": "lifecycle-fleet"}
    # Decrypted now, at send time, in this worker only.
    auth = _bearer(ctx, auth_secret) if auth_secret is not None else None
    if (key := signing_key(ctx)) is not None:
        headers["X-Fleet-Signature"] = sign(key, int(time.time()), body)
    response = httpx.post(url, content=body, headers=headers, auth=auth,
                          timeout=settings.webhook_timeout)
    if response.status_code == 429 or response.status_code >= 500:
        raise TransientError(f"webhook {url} answered {response.status_code}")
    if response.status_code >= 300:
        raise OperatorError(f"webhook {url} answered {response.status_code}")
    return {"status": response.status_code, **(decision.as_result() if decision else {})}
