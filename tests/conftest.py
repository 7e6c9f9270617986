"""Shared fixtures: a real server on a free port and a real HTTP client."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest
import trustme

from tests.helpers import base_url, running_server
from tests.redis_server import RedisServer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from plasma_trio.app import Running


@pytest.fixture
async def server() -> AsyncIterator[Running]:
    async with running_server() as running:
        yield running


@pytest.fixture
async def client(server: Running) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url(server), timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A throwaway certificate authority that test clients trust."""
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """A certificate for localhost/127.0.0.1 from ``ca``, as server settings."""
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return {"tls_cert_file": str(cert_file), "tls_key_file": str(key_file)}


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
