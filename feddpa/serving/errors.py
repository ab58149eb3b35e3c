"""Typed serving errors: what crosses the boundary between the Personalizer deployment and the
ingress is a `Failure` (an HTTP status and a plain sentence), never an exception. An exception
raised in a Ray Serve replica reaches the caller as a RayTaskError whose message is the remote
traceback (actor ids, addresses, terminal colour codes); a returned `Failure` is plain data.
Unexpected errors are logged with their traceback and the request id; the client gets the id only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


class UnknownClient(KeyError):
    pass


class TooLarge(ValueError):
    """A request over one of the serving limits (413)."""


class Unavailable(RuntimeError):
    """The replica cannot serve this request now, but may soon (503 + Retry-After)."""


@dataclass(frozen=True)
class Failure:
    status: int
    message: str
    retry: bool = False  # answer with Retry-After


class ServingError(Exception):
    """A `Failure` raised on the ingress side, mapped to the documented JSON error."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def failure_of(err: BaseException, request_id: str) -> Failure:
    """The Failure a client sees for `err`; unexpected errors are logged here with the id."""
    if isinstance(err, ServingError):
        return err.failure
    if isinstance(err, UnknownClient):
        return Failure(404, f"unknown client {err.args[0]}: use an id from GET /v1/clients")
    if isinstance(err, TooLarge):
        return Failure(413, str(err))
    if isinstance(err, Unavailable):
        return Failure(503, str(err), retry=True)
    if isinstance(err, ValueError):
        return Failure(422, str(err))
    log.error("request %s failed", request_id, exc_info=err)
    return Failure(500, internal_error(request_id))


def internal_error(request_id: str) -> str:
    return f"internal error (request id {request_id}); the server log has the details"
