"""Fixtures of the provider tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fake_http import FakeHTTPServer


@pytest.fixture
def server() -> Iterator[FakeHTTPServer]:
    """A fresh fake HTTP server for one test (see tests/support/fake_http.py)."""
    with FakeHTTPServer() as fake:
        yield fake
