"""Shared fixtures: a real server on a free port and a real HTTP client."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest

from tests.helpers import base_url, running_server
from tests.redis_server import RedisServer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from plasma_trio.app import Running


@pytest.fixture
async def server() -> AsyncIterator[Running]:
    async with running_server() as running:
        yield running


@pytest.fixture
async def client(server: Running) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url(server), timeout=10) as c:
        yield c


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
