"""The frontend's edge checks, shared by the HTTP API and the public NATS subjects.

Both run before any work is done on a request (over HTTP, before its body is even read):

1. **API key** (:func:`authorization_error`): with a key configured (``--api-key`` or
   ``$TANDEM_API_KEY``), a request must carry ``Authorization: Bearer <key>`` (an HTTP header,
   or a NATS message header of the same name); otherwise 401 ``invalid_api_key``. The key is
   compared in constant time (:func:`hmac.compare_digest`).
2. **Admission** (:class:`Admission`): at most ``--max-inflight`` completion requests run at
   once, HTTP and NATS together. One more is refused at once with 429 and a retry hint
   (``Retry-After: 1``), never queued: under overload the frontend's memory stays bounded by
   the limit, not by the offered load. A slot is released on every exit path (response sent,
   error, client disconnect, cancellation).
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Iterator

from tandem.protocol.openai import OpenAIError

__all__ = ["ADMISSION_RETRY_AFTER_S", "Admission", "authorization_error"]

#: Retry hint (seconds) of the 429 a full frontend answers.
ADMISSION_RETRY_AFTER_S = 1.0


class Admission:
    """Counts the completion requests in flight; refuses more than ``limit`` (0 = no limit).

    Not thread-safe: used from the event loop only. ``inflight`` is the number held now,
    ``admitted`` and ``rejected`` count since start.
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0 (0 = unlimited), got {limit}")
        self.limit = limit
        self.inflight = 0
        self.admitted = 0
        self.rejected = 0

    def try_acquire(self) -> bool:
        """Take a slot; False (and counted as rejected) when all ``limit`` are held."""
        if self.limit and self.inflight >= self.limit:
            self.rejected += 1
            return False
        self.inflight += 1
        self.admitted += 1
        return True

    def release(self) -> None:
        """Give back a slot taken by :meth:`try_acquire`."""
        if self.inflight <= 0:
            raise RuntimeError("Admission.release() without a held slot")
        self.inflight -= 1

    def busy_error(self) -> OpenAIError:
        """The 429 a refused request gets (``Retry-After`` = :data:`ADMISSION_RETRY_AFTER_S`)."""
        return OpenAIError(
            429,
            f"The server is busy: {self.limit} requests are in flight, the most it takes at once "
            "(--max-inflight). Retry shortly.",
            type="rate_limit_error",
            code="server_busy",
            retry_after_s=ADMISSION_RETRY_AFTER_S,
        )

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold a slot for the ``with`` block; raises :meth:`busy_error` (429) when full. The slot
        is released however the block ends (including ``CancelledError``)."""
        if not self.try_acquire():
            raise self.busy_error()
        try:
            yield
        finally:
            self.release()


def authorization_error(header: str | None, key: str | None) -> OpenAIError | None:
    """None if ``key`` is None (no key required) or ``header`` (the ``Authorization`` value) is
    ``Bearer <key>``; else the 401 to answer (OpenAI's body, code ``invalid_api_key``).

    The scheme is case-insensitive; the key is compared in constant time.
    """
    if key is None:
        return None
    scheme, _, token = (header or "").strip().partition(" ")
    if not header or scheme.lower() != "bearer" or not token.strip():
        return OpenAIError(
            401,
            "Missing API key: send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        return OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return None
