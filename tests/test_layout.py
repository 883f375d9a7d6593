"""The layout keeps its promises: one folder per runtime role, imports in one direction, no
import circles, light client hosts, no module past 500 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mii"
pytestmark = pytest.mark.timeout(120)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The mii modules a file imports, anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in MODULES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    """One import circle among mii's modules, if there is any."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_circle():
    assert _cycle() is None


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("mii.worker", "mii.producer"),  # a worker is no client
        ("mii.worker", "mii.gateway"),
        ("mii.worker", "mii.launch"),
        ("mii.engine", "mii.worker"),  # the engine knows no queue
        ("mii.engine", "mii.broker_config"),
        ("mii.broker_config", "mii.producer"),  # the contract depends on nobody
        ("mii.broker_config", "mii.worker"),
        ("mii.producer", "mii.worker"),
        ("mii.producer", "mii.gateway"),
        ("mii.gateway", "mii.worker"),
        ("mii.gateway", "mii.engine"),
    ],
)
def test_imports_go_one_way(package, forbidden):
    wrong = [
        (source, target)
        for source, targets in GRAPH.items()
        if source.startswith(package)
        for target in targets
        if target == forbidden or target.startswith(forbidden + ".")
    ]
    assert not wrong


def test_no_module_passes_500_lines():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 500}
    assert not long


@pytest.mark.parametrize(
    "code",
    [
        "import mii.producer.client, mii.producer.bulk.jobs",  # a client host
        "import mii.gateway.app",  # a gateway host
        "import sys; sys.argv = ['mii', '--help']; import mii.cli; mii.cli.build_parser()",
    ],
)
def test_client_and_gateway_hosts_import_no_torch(code):
    check = "; import sys; heavy = {'torch', 'triton', 'transformers'} & set(sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code + check + "; print(sorted(heavy))"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_engine_imports_no_triton_before_a_kernel_runs():
    """tests/kernels runs its kernels in Triton's interpreter only where triton is first
    imported after it set TRITON_INTERPRET; an engine module that imported triton while the
    tests are collected turned ~400 interpreter tests into skips of the one-process suite."""
    code = (
        "import sys, mii.engine.engine, mii.engine.model_runner, mii.engine.loader; "
        "print('triton' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
