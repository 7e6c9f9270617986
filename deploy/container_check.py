"""Build the image with podman, run it, and check it from outside (`nox -s container`).

Follows the recipe checked on these machines (see README "Containers"):
runc instead of crun, the host's nofile limit, a Debian base made with
debootstrap when the default base image cannot be pulled, the host CA bundle
mounted into the build only. Checks, against the running container: /hc, /livez, /readyz,
an SSE event, a gRPC event (grpcio), /metrics/plasma, the image's
HEALTHCHECK, and that `podman stop` ends it promptly with exit status 0.
"""

from __future__ import annotations

import glob
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/plasma-trio:check"
BASE = "localhost/debian-bookworm:base"
NAME = "plasma-trio-check"


def run(*cmd: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=check, text=True, **kwargs)  # type: ignore[call-overload]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def containers_conf() -> str:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    path = Path(tempfile.mkdtemp()) / "containers.conf"
    path.write_text(
        '[engine]\nruntime = "runc"\n\n'
        f'[containers]\ndefault_ulimits = ["nofile={hard}:{hard}", "nproc=16384:16384"]\n'
    )
    return str(path)


def apt_mirror() -> str:
    for source in glob.glob("/etc/apt/sources.list.d/*.sources"):
        for line in Path(source).read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    return "http://deb.debian.org/debian"


def ensure_base() -> str:
    if os.environ.get("BASE_IMAGE"):
        return os.environ["BASE_IMAGE"]
    if run("podman", "image", "exists", BASE, check=False).returncode == 0:
        return BASE
    target = tempfile.mkdtemp(prefix="bookworm-")
    run(
        "debootstrap",
        "--variant=minbase",
        "bookworm",
        target,
        apt_mirror(),
        stdout=subprocess.DEVNULL,
    )
    tar = subprocess.Popen(["tar", "-C", target, "-c", "."], stdout=subprocess.PIPE)
    run("podman", "import", "-", BASE, stdin=tar.stdout, stdout=subprocess.DEVNULL)
    tar.wait()
    shutil.rmtree(target, ignore_errors=True)
    return BASE


REDIS_IMAGE = "localhost/plasma-redis:check"
REDIS_CONTAINERFILE = """\
FROM {base}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
    redis-server && rm -rf /var/lib/apt/lists/*
CMD ["redis-server", "--save", "", "--appendonly", "no", "--protected-mode", "no"]
"""


def ensure_redis_image(base: str) -> None:
    """A Redis image for the compose and kube checks (registries are unreachable here)."""
    if os.environ.get("REDIS_IMAGE"):
        return
    if run("podman", "image", "exists", REDIS_IMAGE, check=False).returncode == 0:
        return
    workdir = Path(tempfile.mkdtemp())
    (workdir / "Containerfile").write_text(REDIS_CONTAINERFILE.format(base=base))
    run("podman", "build", "--network=host", "-t", REDIS_IMAGE, str(workdir))


def sse_receives_published(http: int, publish: list[str]) -> None:
    """Subscribe over SSE, publish through Redis with ``publish`` + event, expect it."""
    event = json.dumps({"meta": {"type": "deploy:check"}, "data": {"ok": True}})
    with httpx.stream(
        "GET",
        f"http://127.0.0.1:{http}/?eventType=deploy",
        headers={"Accept": "text/event-stream"},
        timeout=15,
    ) as resp:
        assert resp.status_code == 200, resp.status_code
        lines = resp.iter_lines()
        assert next(lines).startswith("retry:")
        deadline = time.monotonic() + 10
        while run(*publish, event, capture_output=True).stdout.strip() in ("0", "(integer) 0"):
            assert time.monotonic() < deadline, "plasma-trio never subscribed to Redis"
            time.sleep(0.3)
        for line in lines:
            if line.startswith("data: "):
                assert json.loads(line[6:])["data"] == {"ok": True}
                return


def check_compose(base: str) -> None:
    ensure_redis_image(base)
    http = free_port()
    env = {
        **os.environ,
        "REDIS_IMAGE": os.environ.get("REDIS_IMAGE", REDIS_IMAGE),
        "PLASMA_IMAGE": IMAGE,
        "PLASMA_HTTP_PORT": str(http),
        "PLASMA_GRPC_PORT_HOST": str(free_port()),
        "PLASMA_METRICS_PORT_HOST": str(free_port()),
    }
    compose = [
        sys.executable,
        "-m",
        "podman_compose",
        "-p",
        "plasmacheck",
        "-f",
        str(ROOT / "deploy" / "compose.yaml"),
    ]
    run(*compose, "up", "-d", env=env)
    try:
        wait_healthy(f"http://127.0.0.1:{http}/readyz")
        check_probes(http)
        # The service inherits the image's HEALTHCHECK (/livez).
        health = run("podman", "healthcheck", "run", "plasmacheck_plasma_1", check=False)
        assert health.returncode == 0, health
        sse_receives_published(
            http, ["podman", "exec", "plasmacheck_redis_1", "redis-cli", "PUBLISH", "plasma"]
        )
        print("compose ok", flush=True)
    finally:
        run(*compose, "down", env=env, check=False)


def check_kube(base: str) -> None:
    ensure_redis_image(base)
    http = free_port()
    manifest = (ROOT / "deploy" / "kube.yaml").read_text()
    manifest = manifest.replace(
        "docker.io/library/redis:7", os.environ.get("REDIS_IMAGE", REDIS_IMAGE)
    )
    manifest = manifest.replace("localhost/plasma-trio:latest", IMAGE)
    manifest = manifest.replace("hostPort: 8080", f"hostPort: {http}")
    manifest = manifest.replace("hostPort: 50051", f"hostPort: {free_port()}")
    manifest = manifest.replace("hostPort: 9999", f"hostPort: {free_port()}")
    path = Path(tempfile.mkdtemp()) / "kube.yaml"
    path.write_text(manifest)
    run("podman", "kube", "play", str(path))
    try:
        wait_healthy(f"http://127.0.0.1:{http}/readyz")
        check_probes(http)
        sse_receives_published(
            http, ["podman", "exec", "plasma-trio-redis", "redis-cli", "PUBLISH", "plasma"]
        )
        print("kube ok", flush=True)
    finally:
        run("podman", "kube", "down", str(path), check=False)


def check_probes(http: int) -> None:
    """The probes the shipped files use: /livez and /readyz answer 200."""
    for path in ("/hc", "/livez", "/readyz"):
        response = httpx.get(f"http://127.0.0.1:{http}{path}", timeout=5)
        assert response.status_code == 200, (path, response.status_code)


def wait_healthy(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} never answered 200")


def main() -> None:
    os.environ["CONTAINERS_CONF"] = containers_conf()
    started = time.monotonic()
    base = ensure_base()
    # --format docker: the OCI image format has no HEALTHCHECK.
    build = [
        "podman",
        "build",
        "--format",
        "docker",
        "--network=host",
        "--build-arg",
        f"BASE_IMAGE={base}",
    ]
    build += ["-t", IMAGE]
    ca = "/etc/ssl/certs/ca-certificates.crt"
    if os.path.exists(ca):
        build += ["-v", f"{ca}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"]
    run(*build, "-f", str(ROOT / "Containerfile"), str(ROOT))
    built = time.monotonic()

    http, grpc_port, metrics = free_port(), free_port(), free_port()
    run("podman", "rm", "-f", NAME, check=False, stdout=subprocess.DEVNULL)
    run(
        "podman",
        "run",
        "-d",
        "--name",
        NAME,
        "-p",
        f"127.0.0.1:{http}:8080",
        "-p",
        f"127.0.0.1:{grpc_port}:50051",
        "-p",
        f"127.0.0.1:{metrics}:9999",
        "-e",
        "PLASMA_SUBSCRIBER_MOCK_INTERVAL=200ms",
        IMAGE,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{http}/readyz")
        check_probes(http)
        with httpx.stream(
            "GET",
            f"http://127.0.0.1:{http}/?eventType=poll,program,other",
            headers={"Accept": "text/event-stream"},
            timeout=10,
        ) as resp:
            assert resp.status_code == 200, resp.status_code
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    assert json.loads(line[6:])["meta"]["type"] in ("poll", "program", "other")
                    break
        print("SSE ok", flush=True)

        sys.path.insert(0, str(ROOT))
        from tests.grpc_clients import grpcio_stubs

        pb2, pb2_grpc = grpcio_stubs()
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            call = pb2_grpc.StreamServiceStub(channel).Events(
                iter([pb2.Request(events=[pb2.EventType(type="poll")])]), timeout=10
            )
            payload = next(call)
            assert payload.eventType.type == "poll", payload
            call.cancel()
        print("gRPC ok", flush=True)

        figures = httpx.get(f"http://127.0.0.1:{metrics}/metrics/plasma", timeout=5).json()
        assert "connections" in figures, figures
        assert "time" in figures, figures
        print("metrics ok", flush=True)

        assert run("podman", "healthcheck", "run", NAME, check=False).returncode == 0
        print("healthcheck ok", flush=True)

        t0 = time.monotonic()
        run("podman", "stop", "-t", "15", NAME)
        stop_s = time.monotonic() - t0
        state = json.loads(run("podman", "inspect", NAME, capture_output=True).stdout)[0]["State"]
        assert state["ExitCode"] == 0, state
        assert stop_s < 10, f"podman stop took {stop_s:.1f}s"
        print(f"stop ok in {stop_s:.1f}s, exit 0", flush=True)
    except BaseException:
        run("podman", "logs", NAME, check=False)
        raise
    finally:
        run("podman", "rm", "-f", NAME, check=False, stdout=subprocess.DEVNULL)
    check_compose(base)
    check_kube(base)
    print(
        f"container check passed: build {built - started:.0f}s, "
        f"total {time.monotonic() - started:.0f}s",
        flush=True,
    )


if __name__ == "__main__":
    main()
