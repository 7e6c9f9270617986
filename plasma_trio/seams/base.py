"""What a seam is made of: the requirements it lists and the check that verifies them.

Each seam module (:mod:`plasma_trio.seams`) lists what it relies on as
:class:`Requirement` records and verifies them with :func:`verify`, which
raises :class:`SeamBroken` naming the library, its version and every
attribute or signature that changed.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, NamedTuple

from plasma_trio.errors import PlasmaError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = ["Requirement", "SeamBroken", "installed_version", "verify"]


class SeamBroken(PlasmaError):
    """A library no longer has what its seam module relies on (the server does
    not start: exit status 1)."""

    def __init__(self, library: str, problems: Iterable[str], version: str | None = None) -> None:
        self.library = library
        self.version = version if version is not None else installed_version(library)
        self.problems = list(problems)
        super().__init__(f"{library} {self.version}: {'; '.join(self.problems)}")


def installed_version(distribution: str) -> str:
    """The installed version of ``distribution`` (``"?"`` when unknown)."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


def _label(owner: object) -> str:
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}"
    return getattr(owner, "__qualname__", None) or repr(owner)


class Requirement(NamedTuple):
    """One thing a seam relies on.

    * ``attribute`` on ``owner`` (a class or a module), or on the instance
      ``sample()`` builds when it is an instance attribute;
    * with ``params``: the callable ``owner.attribute`` takes these parameters
      (by name);
    * with ``assigned_in``: ``owner.assigned_in`` assigns ``self.attribute``
      (an instance attribute of an object too costly to build here).
    """

    owner: object
    attribute: str
    sample: Callable[[], object] | None = None
    params: tuple[str, ...] = ()
    assigned_in: str | None = None

    def problem(self) -> str | None:
        """What is wrong, or ``None``."""
        where = _label(self.owner)
        if self.assigned_in is not None:
            if not _assigns(getattr(self.owner, self.assigned_in, None), self.attribute):
                return f"{where}.{self.assigned_in} no longer sets attribute {self.attribute!r}"
            return None
        try:
            target = self.sample() if self.sample is not None else self.owner
        except Exception as exc:  # its constructor changed
            return f"{where} cannot be built as before ({exc!r})"
        if not hasattr(target, self.attribute):
            return f"{where} has no attribute {self.attribute!r}"
        if self.params:
            try:
                signature = inspect.signature(getattr(target, self.attribute))
            except (TypeError, ValueError):
                return f"{where}.{self.attribute} has no signature"
            missing = [p for p in self.params if p not in signature.parameters]
            if missing:
                return (
                    f"{where}.{self.attribute} takes no parameter {', '.join(map(repr, missing))}"
                )
        return None


def _assigns(function: object, attribute: str) -> bool:
    """Whether ``function``'s source assigns ``self.<attribute>``."""
    try:
        source = textwrap.dedent(inspect.getsource(function))  # type: ignore[arg-type]
    except (OSError, TypeError):
        return False
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        for target in targets:
            if (
                isinstance(target, ast.Attribute)
                and target.attr == attribute
                and isinstance(target.value, ast.Name)
                and target.value.id == "self"
            ):
                return True
    return False


def verify(
    library: str,
    requirements: Iterable[Requirement],
    probes: Iterable[Callable[[], str | None]] = (),
    *,
    version: str | None = None,
) -> None:
    """Raise :class:`SeamBroken` listing every requirement not met (and every
    behaviour ``probes`` found changed: each returns what is wrong, or ``None``)."""
    problems = [p for r in requirements if (p := r.problem()) is not None]
    for probe in probes:
        try:
            problem = probe()
        except Exception as exc:  # what it exercises is not there any more
            problem = f"{probe.__name__} failed: {exc!r}"
        if problem is not None:
            problems.append(problem)
    if problems:
        raise SeamBroken(library, problems, version)
