"""Developer and CI sessions: ``nox`` runs lint, typecheck and tests (the default set)."""

from __future__ import annotations

import os
import shutil

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

SOURCES = ["plasma_trio", "tests", "bench", "noxfile.py"]


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.8")
    session.run("ruff", "check", *SOURCES)
    session.run("ruff", "format", "--check", *SOURCES)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package (configured in pyproject.toml)."""
    session.install("mypy>=1.13", ".[test]")
    session.run("mypy")


def _ensure_redis_server(session: nox.Session) -> None:
    """The integration tests start their own redis-server; install it when missing."""
    if shutil.which("redis-server"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        session.log("redis-server is missing: installing the Debian package")
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        session.run("apt-get", "update", "-q", external=True, env=env)
        session.run("apt-get", "install", "-y", "-q", "redis-server", external=True, env=env)
    else:
        session.error("redis-server is not installed (apt-get install redis-server)")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite: unit, property and integration tests on real sockets."""
    _ensure_redis_server(session)
    session.install(".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """SSE fan-out benchmark (load generator outside the server; needs gcc, taskset)."""
    session.install(".")
    session.run("python", "bench/sse_fanout.py", *session.posargs)
