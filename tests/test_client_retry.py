"""The client library's timeout retry: a call that timed out (a hung replica) is sent once more, on a fresh
connection, and only once; a call that is not idempotent, or a client told not to retry, is not resent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from tritonclient.utils import InferenceServerException

from client.inference import TIMEOUT_RETRIES, RequestFailed, TritonClassifier

GRPC_TIMEOUT = InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")


def timing_out(times: int, error: BaseException) -> tuple[Callable[..., str], list[Any]]:
    """A call that times out ``times`` times, then answers; and the clients it was made on."""
    used: list[Any] = []

    def call(client: Any, **kwargs: Any) -> str:
        used.append(client)
        if len(used) <= times:
            raise error
        return "answer"

    return call, used


@pytest.mark.parametrize("protocol, error", [("grpc", GRPC_TIMEOUT), ("http", TimeoutError("timed out"))])
def test_a_timeout_is_retried_once_on_a_fresh_connection(protocol, error):
    client = TritonClassifier("127.0.0.1:9", protocol, retries=3, backoff=0)
    call, used = timing_out(1, error)
    assert client._call("inference", call) == "answer"
    assert len(used) == 2 and used[0] is not used[1]  # the second try on a new connection


def test_a_second_timeout_fails_the_request():
    client = TritonClassifier("127.0.0.1:9", "grpc", retries=3, backoff=0)
    call, used = timing_out(2, GRPC_TIMEOUT)
    with pytest.raises(RequestFailed, match=r"within 10 s \(2 attempts\)"):
        client._call("inference", call)
    assert len(used) == 1 + TIMEOUT_RETRIES


@pytest.mark.parametrize("retries, idempotent", [(0, True), (3, False)])
def test_no_resend_without_retries_or_for_a_call_that_is_not_idempotent(retries, idempotent):
    client = TritonClassifier("127.0.0.1:9", "grpc", retries=retries, backoff=0)
    call, used = timing_out(1, GRPC_TIMEOUT)
    with pytest.raises(RequestFailed, match="no answer"):
        client._call("inference", call, idempotent=idempotent)
    assert len(used) == 1


def test_a_connection_closed_without_an_answer_is_retried_on_a_fresh_one():
    """What HAProxy does to an HTTP keep-alive request it could not place anywhere: it closes the connection."""
    from geventhttpclient.response import HTTPConnectionClosed

    client = TritonClassifier("127.0.0.1:9", "http", retries=3, backoff=0)
    call, used = timing_out(1, HTTPConnectionClosed("connection closed."))
    assert client._call("inference", call) == "answer"
    assert len(used) == 2 and used[0] is not used[1]
