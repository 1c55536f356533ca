"""Shared checks for the robustness tests (hostile input, soak, faults)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import httpx

OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}
OPENAI_ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error",
                      "rate_limit_error", "server_error"}


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    """The response is `status` with OpenAI's error body; returns the `error` object."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    assert set(payload) == {"error"}, payload
    error = payload["error"]
    assert set(error) == OPENAI_ERROR_KEYS, error
    assert error["type"] in OPENAI_ERROR_TYPES, error
    assert isinstance(error["message"], str) and len(error["message"]) >= 10, error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


def metric_total(page: str, name: str) -> float:
    """Sum of every sample of one metric on a Prometheus text page (all label sets)."""
    pattern = r"^" + re.escape(name) + r"(?:\{[^}]*\})? ([-+0-9.eE]+|NaN)$"
    return sum(float(v) for v in re.findall(pattern, page, re.M))


def wait_until(condition: Callable[[], object], timeout: float, what: str,
               interval: float = 0.1) -> object:
    """Poll `condition` until it returns something true (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
