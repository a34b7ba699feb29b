"""The package's layers, checked over the source with :mod:`ast` (no import is executed).

- ``ipsecct/ipsec`` (IPsec core), ``ipsecct/ct`` (context-transfer core) and ``ipsecct/ikev2``
  (the IKEv2 protocol) are sans-I/O: they import none of asyncio, socket, ssl, selectors,
  threading, subprocess, and read no clock (no ``time`` import, no
  ``.now()``/``.utcnow()``/``.today()`` call; ``datetime`` as a type is fine, IKE checks
  certificate validity at the ``now`` it is given).
- The dependency direction is one way: ipsec < ct, ikev2 < gateway < demo, bench, commands,
  cli (ct and ikev2 side by side, neither importing the other).
  ``tools`` (pcap, key files, PKI) uses ipsec only. ``ipsecct.errors`` and the package's
  ``__init__`` are below everything.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "ipsecct"

# Rank of each part of the package: a module may import only parts of a lower rank, its own
# part, or those listed in ALSO.
RANK = {
    "errors": 0,
    "__init__": 0,
    "ipsec": 1,
    "tools": 2,
    "ct": 2,
    "ikev2": 2,
    "gateway": 3,
    "demo": 4,
    "bench": 4,
    "commands": 4,
    "cli": 4,
    "__main__": 4,
}
# Same-rank parts that may not import each other (tools is a side branch on ipsec).
APART = {frozenset({"tools", "ct"}), frozenset({"tools", "ikev2"}), frozenset({"ct", "ikev2"})}
SANS_IO = {"ipsec", "ct", "ikev2"}
FORBIDDEN_IN_CORE = {
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "threading",
    "subprocess",
    "time",  # every function of it reads a clock or sleeps
}
CLOCK_CALLS = {"now", "utcnow", "today"}  # datetime.now() and the like, however imported


@dataclass(frozen=True)
class Violation:
    file: str
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.problem}"


def part_of(module: str) -> str | None:
    """``ipsecct.gateway.node`` -> ``gateway``; ``ipsecct`` -> ``__init__``."""
    parts = module.split(".")
    if parts[0] != "ipsecct":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(package: str, name: str) -> str:
    """``package.name`` if that is a module or package of ours, else ``package``."""
    candidate = SRC.parent.joinpath(*package.split("."), name)
    if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
        return f"{package}.{name}"
    return package


def imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every import, at any depth (function-level ones too)."""
    out: list[tuple[int, str]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from . import cxtp" / "from .. import ct": a name may be a submodule
            out += [(node.lineno, resolve(target, a.name)) for a in node.names]
    return out


def check_source(text: str, module: str, file: str, *, is_package: bool = False) -> list[Violation]:
    tree = ast.parse(text, file)
    me = part_of(module)
    found: list[Violation] = []
    if me is not None and me not in RANK:
        return [Violation(file, 1, f"part {me} has no layer (add it to RANK)")]
    for line, target in imports(tree, module, is_package):
        top = target.split(".")[0]
        if me in SANS_IO and top in FORBIDDEN_IN_CORE:
            found.append(Violation(file, line, f"the sans-I/O core imports {top}"))
        other = part_of(target)
        if other is None or me is None or other == me:
            continue
        if other not in RANK:
            found.append(Violation(file, line, f"imports {target}: part {other} has no layer"))
            continue
        if RANK[other] > RANK[me] or (
            RANK[other] == RANK[me] and (RANK[me] < 4 or frozenset({me, other}) in APART)
        ):
            found.append(Violation(file, line, f"{me} imports {other} ({target}): a higher layer"))
    if me in SANS_IO:
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in CLOCK_CALLS
            ):
                problem = f"the sans-I/O core reads a clock (.{node.func.attr}())"
                found.append(Violation(file, node.lineno, problem))
    return found


def source_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_part_has_a_layer() -> None:
    parts = {part_of(module_name(p)) for p in source_files()}
    assert parts and parts <= set(RANK), parts - set(RANK)


def test_layers() -> None:
    violations: list[Violation] = []
    for p in source_files():
        violations += check_source(
            p.read_text(),
            module_name(p),
            str(p.relative_to(SRC.parent)),
            is_package=p.name == "__init__.py",
        )
    assert not violations, "\n".join(map(str, violations))


@pytest.mark.parametrize(
    ("module", "text", "problem"),
    [
        ("ipsecct.ipsec.esp", "import asyncio\n", "imports asyncio"),
        ("ipsecct.ct.transfer", "import socket as s\n", "imports socket"),
        ("ipsecct.ct.transfer", "def f():\n    import ssl\n", "imports ssl"),
        ("ipsecct.ipsec.sad", "from time import monotonic\n", "imports time"),
        ("ipsecct.ct.failover", "from threading import Lock\n", "imports threading"),
        ("ipsecct.ct.context", "x = dt.datetime.now()\n", "reads a clock"),
        ("ipsecct.ipsec.engine", "from ..ct import cxtp\n", "ipsec imports ct"),
        ("ipsecct.ipsec.engine", "from ipsecct.gateway import node\n", "ipsec imports gateway"),
        ("ipsecct.ct.transfer", "from ..gateway import config\n", "ct imports gateway"),
        ("ipsecct.ct.transfer", "from ..tools.keyfile import x\n", "ct imports tools"),
        ("ipsecct.tools.pcap", "from ..ct import context\n", "tools imports ct"),
        ("ipsecct.gateway.node", "from ..demo.topology import Demo\n", "gateway imports demo"),
        ("ipsecct.gateway.node", "from .. import commands\n", "gateway imports commands"),
        ("ipsecct.errors", "from .ipsec import sad\n", "errors imports ipsec"),
    ],
)
def test_the_check_finds(module: str, text: str, problem: str) -> None:
    found = check_source(text, module, "x.py")
    assert len(found) == 1 and problem in found[0].problem, found


@pytest.mark.parametrize(
    ("module", "text"),
    [
        ("ipsecct.ct.transfer", "from ..ipsec.engine import Engine\nfrom . import cxtp\n"),
        ("ipsecct.gateway.node", "import asyncio, socket, time\nfrom ..ct import transfer\n"),
        ("ipsecct.demo.tour", "from ..gateway.service import Service\nfrom . import handover\n"),
        ("ipsecct.bench.codec", "from ..commands.args import number\n"),
        ("ipsecct.tools.pcap", "from ..ipsec import esp\nfrom ..errors import PacketError\n"),
        ("ipsecct.ikev2.auth", "import datetime as dt\nd = dt.datetime.fromtimestamp(0)\n"),
    ],
)
def test_the_check_allows(module: str, text: str) -> None:
    assert check_source(text, module, "x.py") == []
