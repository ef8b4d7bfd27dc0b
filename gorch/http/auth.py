"""Who may call: the bearer token, signed requests (gorch's scheme and Standard Webhooks), replays.

**gorch's scheme (v1).** The sender computes HMAC-SHA256, with the shared
secret, of the canonical message::

    gorch-v1 \\n METHOD \\n raw path \\n raw query \\n timestamp \\n Idempotency-Key \\n body

(``\\n`` is one newline byte; no spaces) and sends ``X-Gorch-Signature:
v1=<hex>`` with ``X-Gorch-Timestamp: <unix seconds>``. The raw path is the path
exactly as sent on the wire, percent-encoding included, with any mount prefix
(``/gorch/workflows/o-1/events/pay``); the raw query is what follows ``?``
(empty if none); the Idempotency-Key is the header's value, empty if none.
So a signature is good for one method, one URL, one body and one key: an
approval signed for instance ``a`` is refused for ``b``, a cancel for one
instance cancels no other. :func:`sign` makes the headers.

**Standard Webhooks.** A sender that already speaks it sends ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature`` (verified with the
``standardwebhooks`` package; a ``whsec_...`` secret is used as that scheme
defines it, any other secret as its UTF-8 bytes). Its signature does not
cover the method or the path, so its ``webhook-id`` doubles as the request's
idempotency key and the signature is refused if it comes back anywhere.

**Replays.** The timestamp is required and must be within the tolerance of
the server's clock. A signed POST/PUT/PATCH/DELETE is remembered in the
store (``Store.remember``) until its timestamp leaves the window, so the
same signed request is accepted once, in every process sharing the store;
a second use is ``409 ReplayedRequest``. A sender that retries signs again
(a new timestamp) and keeps the same ``Idempotency-Key``: the retry passes
the replay check and the Engine applies it at most once. Signed GETs are
bound to their URL and time but not remembered (reads change nothing).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.datastructures import Headers
from starlette.types import Scope

from gorch import clock
from gorch.http.errors import HTTPError

SIGNATURE_HEADER = "X-Gorch-Signature"
TIMESTAMP_HEADER = "X-Gorch-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
SCHEME = "v1"
"""The version of gorch's signature scheme: the prefix of the signature header's value."""

_TAG = b"gorch-v1"
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
"""Unix seconds in ASCII digits (``str.isdigit`` would also take ``²``)."""
_HEX = re.compile(r"[0-9a-fA-F]{64}")

Secret = str | bytes


def secret_list(secret: Secret | Sequence[Secret] | None) -> tuple[Secret, ...]:
    """The secrets as given (one, or several during a rotation); refuses empty ones."""
    if secret is None:
        return ()
    items = [secret] if isinstance(secret, (str, bytes)) else list(secret)
    if not items or not all(isinstance(s, (str, bytes)) and s for s in items):
        raise ValueError("secret must be a non-empty string (or a list of them)")
    return tuple(items)


def _key(secret: Secret) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


def _bytes(text: str | bytes) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def message(
    method: str,
    path: str | bytes,
    query: str | bytes,
    timestamp: str | bytes,
    key: str | bytes,
    body: bytes,
) -> bytes:
    """The canonical message of gorch's v1 scheme (see the module docs)."""
    fields = [_TAG, method.upper().encode("ascii"), _bytes(path), _bytes(query)]
    fields += [_bytes(timestamp), _bytes(key), body]
    return b"\n".join(fields)


def sign(
    secret: Secret,
    method: str,
    path: str,
    body: bytes | str = b"",
    *,
    query: str | None = None,
    timestamp: int | None = None,
    key: str | None = None,
) -> dict[str, str]:
    """The headers that sign one request for an app created with ``secret``.

    ``path`` is the path as sent (percent-encoded, with any mount prefix) and
    may carry the query (``"/workflows/o-1/events/pay?pc=3"``) unless
    ``query`` is given. ``timestamp`` defaults to now (unix seconds). With
    ``key``, the ``Idempotency-Key`` header is added and signed too. Sign
    each attempt anew: a signature is accepted once.
    """
    if query is None:
        path, _, query = path.partition("?")
    ts = str(int(time.time() if timestamp is None else timestamp))
    raw = message(method, path, query, ts, key or "", _bytes(body))
    digest = hmac.new(_key(secret), raw, hashlib.sha256).hexdigest()
    headers = {SIGNATURE_HEADER: f"{SCHEME}={digest}", TIMESTAMP_HEADER: ts}
    if key is not None:
        headers[IDEMPOTENCY_HEADER] = key
    return headers


@dataclass(frozen=True, slots=True)
class Verified:
    """A request whose signature checked out."""

    replay_key: str
    """What ``Store.remember`` records: the digest of what was signed."""
    until: datetime
    """When the timestamp leaves the tolerance window (then the key may be forgotten)."""
    idempotency_key: str | None
    """Standard Webhooks' ``webhook-id``; None for gorch's scheme (it signs the header)."""


def _unauthorized(detail: str) -> HTTPError:
    return HTTPError(401, "InvalidSignature", detail)


def _raw_target(scope: Scope) -> tuple[bytes, bytes]:
    """The path and query as the client sent them (mount prefix and percent-encoding kept)."""
    raw = scope.get("raw_path")
    if not raw:  # a server that does not pass raw_path: rebuild it
        raw = quote(scope["path"]).encode("ascii")  # the full path, prefix included
    path = bytes(raw).partition(b"?")[0]
    return path, bytes(scope.get("query_string", b""))


class Authenticator:
    """Checks the token and the signatures of requests (pure: no store access)."""

    def __init__(
        self,
        *,
        token: str | None,
        secret: Secret | Sequence[Secret] | None,
        tolerance: float,
    ) -> None:
        if token is not None and not token:
            raise ValueError("token must be a non-empty string")
        if tolerance <= 0:
            raise ValueError(f"signature_tolerance must be positive, got {tolerance}")
        secrets = secret_list(secret)
        self.token = None if token is None else token.encode("utf-8")
        self.keys = tuple(_key(s) for s in secrets)
        try:
            self.webhooks = tuple(
                Webhook(s) if isinstance(s, str) and s.startswith("whsec_") else Webhook(_key(s))
                for s in secrets
            )
        except ValueError as e:  # a whsec_ secret that is not base64
            raise ValueError(f"a 'whsec_' secret must be base64 after the prefix: {e}") from e
        self.tolerance = tolerance

    @property
    def signed(self) -> bool:
        """Whether requests must be signed (a secret was given)."""
        return bool(self.keys)

    # ------------------------------------------------------------------ token

    def check_token(self, headers: Headers) -> None:
        """401 ``Unauthorized`` unless ``Authorization: Bearer <token>`` is right."""
        if self.token is None:
            return
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        given = credentials.strip().encode("latin-1")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.token):
            raise HTTPError(
                401,
                "Unauthorized",
                "this route needs the header 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )

    # ------------------------------------------------------------------ signatures

    def verify(self, scope: Scope, headers: Headers, body: bytes) -> Verified:
        """Check the request's signature (either scheme) and timestamp; 401 if wrong."""
        if SIGNATURE_HEADER in headers:
            return self._verify_gorch(scope, headers, body)
        if any(h in headers for h in ("webhook-signature", "webhook-id", "webhook-timestamp")):
            return self._verify_standard(headers, body)
        raise _unauthorized(
            f"this request must be signed: {SIGNATURE_HEADER} and {TIMESTAMP_HEADER} "
            "(see gorch.http.sign), or Standard Webhooks' webhook-id, webhook-timestamp "
            "and webhook-signature"
        )

    def _timestamp(self, name: str, text: str | None) -> int:
        if text is None or not text.strip():
            raise _unauthorized(f"this request needs a {name} header (unix seconds)")
        if not _TIMESTAMP.fullmatch(text.strip()):
            raise _unauthorized(f"{name} must be unix seconds in ASCII digits, got {text!r}")
        return int(text.strip())

    def _check_window(self, name: str, ts: int) -> datetime:
        now = clock.now().timestamp()
        if now - ts > self.tolerance:
            raise HTTPError(
                401,
                "SignatureExpired",
                f"{name} is {now - ts:.0f} s old (tolerance {self.tolerance:g} s): "
                "a replayed or delayed request; sign it again with the current time",
            )
        if ts - now > self.tolerance:
            raise HTTPError(
                401,
                "SignatureExpired",
                f"{name} is {ts - now:.0f} s in the future (tolerance {self.tolerance:g} s): "
                "check the sender's clock",
            )
        return datetime.fromtimestamp(ts + self.tolerance + 1, UTC)

    def _verify_gorch(self, scope: Scope, headers: Headers, body: bytes) -> Verified:
        given = headers.get(SIGNATURE_HEADER, "").strip()
        scheme, _, digest = given.partition("=")
        if scheme.strip() != SCHEME or not _HEX.fullmatch(digest.strip()):
            raise _unauthorized(
                f"{SIGNATURE_HEADER} must look like '{SCHEME}=<64 hex digits>': HMAC-SHA256 "
                "of method, path, query, timestamp, Idempotency-Key and body "
                "(see gorch.http.sign)"
            )
        ts_text = headers.get(TIMESTAMP_HEADER)
        ts = self._timestamp(TIMESTAMP_HEADER, ts_text)
        path, query = _raw_target(scope)
        key = headers.get(IDEMPOTENCY_HEADER, "").strip().encode("latin-1")
        raw = message(scope["method"], path, query, str(ts), key, body)
        digest = digest.strip().lower()
        if not any(
            hmac.compare_digest(hmac.new(k, raw, hashlib.sha256).hexdigest(), digest)
            for k in self.keys
        ):
            raise _unauthorized(
                f"{SIGNATURE_HEADER} does not match this request: it must sign its method, "
                f"path, query, {TIMESTAMP_HEADER}, {IDEMPOTENCY_HEADER} and body"
            )
        until = self._check_window(TIMESTAMP_HEADER, ts)
        return Verified("gorch.http:v1:" + hashlib.sha256(raw).hexdigest(), until, None)

    def _verify_standard(self, headers: Headers, body: bytes) -> Verified:
        msg_id = headers.get("webhook-id", "").strip()
        signature = headers.get("webhook-signature", "").strip()
        if not msg_id or not signature:
            raise _unauthorized(
                "Standard Webhooks needs webhook-id, webhook-timestamp and webhook-signature"
            )
        ts = self._timestamp("webhook-timestamp", headers.get("webhook-timestamp"))
        given = {
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": signature,
        }
        expired = False
        for webhook in self.webhooks:
            try:
                webhook.verify(body, given, json_parse=False)
            except WebhookVerificationError as e:
                expired = expired or "timestamp" in str(e).lower()
                continue
            break
        else:
            if expired:  # the library's own window (5 minutes) is narrower than ours
                self._check_window("webhook-timestamp", ts)
                raise HTTPError(
                    401, "SignatureExpired", "webhook-timestamp is more than 5 minutes away"
                )
            raise _unauthorized(
                "webhook-signature does not match webhook-id, webhook-timestamp and the body"
            )
        until = self._check_window("webhook-timestamp", ts)
        signed = f"{msg_id}.{ts}.".encode("latin-1") + body
        return Verified("gorch.http:sw:" + hashlib.sha256(signed).hexdigest(), until, msg_id)

    # ------------------------------------------------------------------ replays

    @staticmethod
    def replayed() -> HTTPError:
        """409 ``ReplayedRequest``: ``Store.remember`` knew this signed request already."""
        return HTTPError(
            409,
            "ReplayedRequest",
            "this signed request was already received: a signature is accepted once. "
            "To retry, sign the request again (a new timestamp) and send the same "
            f"{IDEMPOTENCY_HEADER} so that it is applied at most once",
        )
