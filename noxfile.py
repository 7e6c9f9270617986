"""Developer and CI sessions: ``nox`` runs lint, typecheck and tests (the default set)."""

from __future__ import annotations

import os
import shutil

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "container"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

SOURCES = ["plasma_trio", "tests", "bench", "deploy", "noxfile.py"]
# Every dependency of the package and its test extra, pinned with hashes
# (pip-compile); refreshed by ``nox -s lock``.
LOCK = "requirements.lock"
# The package's own dependencies only, at the same versions: what the image installs.
RUNTIME_LOCK = "requirements-runtime.lock"


def _install_locked(session: nox.Session, *extra: str) -> None:
    """The locked dependencies (hashes checked), then the package without its own."""
    session.install("--require-hashes", "-r", LOCK)
    session.install("--no-deps", ".")
    if extra:
        session.install(*extra)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.8")
    session.run("ruff", "check", *SOURCES)
    session.run("ruff", "format", "--check", *SOURCES)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package (configured in pyproject.toml)."""
    _install_locked(session, "mypy>=1.13", "types-protobuf")
    session.run("mypy")


def _ensure_package(session: nox.Session, program: str, package: str, why: str) -> None:
    """Install the Debian ``package`` when ``program`` is missing (root with apt-get)."""
    if shutil.which(program):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        session.log(f"{program} is missing ({why}): installing the Debian package")
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        session.run("apt-get", "update", "-q", external=True, env=env)
        session.run("apt-get", "install", "-y", "-q", package, external=True, env=env)
    else:
        session.error(f"{program} is not installed (apt-get install {package})")


def _ensure_redis_server(session: nox.Session) -> None:
    """The integration tests start their own redis-server; install it when missing."""
    _ensure_package(session, "redis-server", "redis-server", "the tests start their own")
    # The /debug console test loads the page in headless Chromium.
    _ensure_package(session, "chromium", "chromium", "the /debug console test")


def _ensure_grpc_js(session: nox.Session) -> None:
    """The grpc-js client tests need Node.js and the packages of tests/js."""
    if not shutil.which("npm"):
        if os.geteuid() == 0 and shutil.which("apt-get"):
            session.log("Node.js is missing: installing the Debian packages")
            env = {"DEBIAN_FRONTEND": "noninteractive"}
            session.run("apt-get", "update", "-q", external=True, env=env)
            session.run("apt-get", "install", "-y", "-q", "nodejs", "npm", external=True, env=env)
        else:
            session.error("Node.js is not installed (apt-get install nodejs npm)")
    session.run(
        "npm",
        "ci",
        "--prefix",
        "tests/js",
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
        external=True,
    )


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite: unit, property and integration tests on real sockets."""
    _ensure_redis_server(session)
    _ensure_grpc_js(session)
    _install_locked(session)
    session.run("pytest", *session.posargs)


@nox.session(default=False)
def lock(session: nox.Session) -> None:
    """Refresh requirements.lock (the package's dependencies and the test extra,
    with hashes) from pyproject.toml, then requirements-runtime.lock (the
    package's own dependencies at the same versions, for the image):
    ``nox -s lock``, then commit both."""
    session.install("pip-tools>=7.4")
    common = [
        "--quiet",
        "--generate-hashes",
        "--strip-extras",
        "--allow-unsafe",
        "--no-emit-index-url",
        "--no-emit-find-links",
    ]
    session.run(
        "pip-compile",
        *common,
        "--upgrade",
        "--extra",
        "test",
        "--output-file",
        LOCK,
        "pyproject.toml",
    )
    # The runtime lock takes the full lock's versions as constraints, so the
    # two cannot disagree (tests/test_lock.py checks it).
    session.run(
        "pip-compile",
        *common,
        "--annotation-style=line",
        "--constraint",
        LOCK,
        "--output-file",
        RUNTIME_LOCK,
        "pyproject.toml",
    )


@nox.session
def bench(session: nox.Session) -> None:
    """SSE fan-out benchmark (load generator outside the server; needs gcc, taskset)."""
    session.install(".")
    session.run("python", "bench/fanout.py", *session.posargs)


PROTO_TOOLS = ["grpcio-tools>=1.70,<2", "betterproto2-compiler>=0.10,<0.11"]


def generate_proto(session: nox.Session, out: str) -> None:
    """Generate plasma_trio/_proto from proto/stream.proto into ``out``."""
    import pathlib

    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    session.run(
        "python",
        "-m",
        "grpc_tools.protoc",
        "-Iproto",
        f"--python_betterproto2_out={out}",
        "--python_betterproto2_opt=client_generation=async,server_generation=async",
        f"--descriptor_set_out={out}/stream.desc",
        "proto/stream.proto",
    )


@nox.session
def proto(session: nox.Session) -> None:
    """Regenerate plasma_trio/_proto (betterproto2 messages and stubs, descriptor set)."""
    import shutil as _shutil

    session.install(*PROTO_TOOLS)
    _shutil.rmtree("plasma_trio/_proto", ignore_errors=True)
    generate_proto(session, "plasma_trio/_proto")


PODMAN_PACKAGES = [
    "podman",
    "runc",
    "iptables",
    "netavark",
    "aardvark-dns",
    "catatonit",
    "debootstrap",
]


@nox.session
def container(session: nox.Session) -> None:
    """Build the image with podman and check SSE, gRPC, /hc and /metrics/plasma from outside.

    Installs podman with apt-get when it is missing and we are root; skipped
    (with the reason) where podman cannot be had.
    """
    if not (shutil.which("podman") and shutil.which("debootstrap")):
        if os.geteuid() == 0 and shutil.which("apt-get"):
            env = {"DEBIAN_FRONTEND": "noninteractive"}
            session.run("apt-get", "update", "-q", external=True, env=env, success_codes=[0, 100])
            session.run(
                "apt-get",
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                *PODMAN_PACKAGES,
                external=True,
                env=env,
                success_codes=[0, 100],
            )
        if not shutil.which("podman"):
            session.skip("podman is not installed and could not be (see README, Containers)")
    _install_locked(session, "podman-compose>=1.2")
    session.run("python", "deploy/container_check.py")
