"""Installs that match the roles: a light base (client and contract), extras for the engine,
workers, Flower, the gateway and the demo model's conversion, `all` for everything; a
missing extra is one clear error naming it; the license and the package's metadata."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mii.extras import EXTRAS

tomllib = pytest.importorskip("tomllib")
pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
HEAVY = ("torch", "triton", "transformers", "celery", "flower", "starlette", "uvicorn", "gguf")


def _names(requirements: list[str]) -> set[str]:
    return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip().lower()
            for r in requirements}  # fmt: skip


def test_the_base_is_light_and_all_installs_every_role():
    assert not _names(PROJECT["dependencies"]) & set(HEAVY)
    extras = PROJECT["optional-dependencies"]
    assert extras["all"] == ["mii[worker,flower,gateway,demo]"]
    assert "mii[engine]" in extras["worker"] and "mii[engine]" in extras["demo"]
    for extra, modules in EXTRAS.items():  # what `require` checks is what the extra installs
        installed = _names(extras[extra])
        for other in [r for r in extras[extra] if r.startswith("mii[")]:
            installed |= _names(extras[other[4:-1]])
        wanted = {m.replace("_", "-") for m in modules}
        assert wanted <= installed, (extra, wanted - installed)


def test_license_and_metadata():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert PROJECT["authors"] and PROJECT["classifiers"] and PROJECT["urls"]


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {"MII_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=50)  # fmt: skip


def _without(modules: tuple[str, ...], then: str) -> str:
    blank = "; ".join(f"sys.modules[{m!r}] = None" for m in modules)
    return f"import sys; {blank}\n{then}"


def test_the_demo_model_without_gguf_names_the_extra(tmp_path):
    code = _without(("gguf",), "import mii\ntry: mii.pipeline('smollm2')\n"
                    "except ImportError as exc: print(exc)")  # fmt: skip
    out = _run(code, tmp_path)
    assert "needs 'gguf', which is not installed: install mii's extra 'demo'" in out.stdout, out
    assert not list(tmp_path.iterdir())  # nothing fetched


def test_a_pipeline_without_torch_names_the_extra(tmp_path):
    code = _without(("torch",), f"import mii\ntry: mii.pipeline({str(tmp_path)!r})\n"
                    "except ImportError as exc: print(exc)")  # fmt: skip
    assert "mii.pipeline needs 'torch', which is not installed: install mii's extra 'engine'" in (
        _run(code, tmp_path).stdout
    )


def test_commands_without_their_extras_are_one_line(tmp_path):
    run = "print(main(['worker', '--deployment', 'd']), main(['gateway', 'd']))"
    code = _without(("celery", "starlette"), "from mii.cli import main\n" + run)
    out = _run(code, tmp_path)
    assert out.stdout.split() == ["1", "1"], out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == [
        "mii worker: mii worker needs 'celery', which is not installed: install mii's extra "
        "'worker' (pip install '.[worker]' in mii's checkout; '.[all]': every role)",
        "mii gateway: mii gateway needs 'starlette', which is not installed: install mii's "
        "extra 'gateway' (pip install '.[gateway]' in mii's checkout; '.[all]': every role)",
    ]


def test_serve_without_the_worker_extra_fails_before_starting_anything(tmp_path):
    code = _without(("celery",), "import mii\ntry: mii.serve('fake')\n"
                    "except ImportError as exc: print(exc)")  # fmt: skip
    assert "pip install '.[worker]'" in _run(code, tmp_path).stdout
