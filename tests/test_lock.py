"""The lock files: the image's runtime lock is exactly the full lock's versions
and hashes for the package's own dependencies, and lacks none of them.

``requirements.lock`` (every dependency, the test extra included) is what nox
and CI install; ``requirements-runtime.lock`` is what the Containerfile
installs. Both come from ``nox -s lock``; these tests fail when one was
edited or refreshed without the other.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==(\S+)")
_HASH = re.compile(r"--hash=(\S+)")


def entries(name: str) -> dict[str, tuple[str, frozenset[str]]]:
    """A lock file's pins: name -> (version, hashes)."""
    pins: dict[str, tuple[str, frozenset[str]]] = {}
    current = None
    hashes: set[str] = set()
    for line in (ROOT / name).read_text().splitlines():
        if match := _PIN.match(line):
            if current is not None:
                pins[current[0]] = (current[1], frozenset(hashes))
            current = (canonicalize_name(match.group(1)), match.group(2))
            hashes = set()
        hashes.update(_HASH.findall(line))
    if current is not None:
        pins[current[0]] = (current[1], frozenset(hashes))
    return pins


def runtime_closure() -> set[str]:
    """The package's dependencies (no extras), and theirs, for this interpreter."""
    seen: set[str] = set()
    todo = ["plasma-trio"]
    while todo:
        dist = metadata.distribution(todo.pop())
        for text in dist.requires or ():
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            name = canonicalize_name(requirement.name)
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def test_the_runtime_lock_has_the_full_locks_versions_and_hashes() -> None:
    full = entries("requirements.lock")
    runtime = entries("requirements-runtime.lock")
    assert runtime, "requirements-runtime.lock pins nothing"
    for name, pin in runtime.items():
        assert full.get(name) == pin, f"{name}: {pin[0]} in the runtime lock, {full.get(name)}"


def test_the_runtime_lock_holds_every_runtime_dependency_and_no_test_tool() -> None:
    runtime = set(entries("requirements-runtime.lock"))
    missing = runtime_closure() - runtime
    assert not missing, f"not in requirements-runtime.lock: {sorted(missing)}"
    assert not {"pytest", "hypothesis", "grpcio"} & runtime
