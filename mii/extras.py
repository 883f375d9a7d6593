"""What each role needs beyond the base install, and a clear error naming the extra to
install when it is missing (pyproject.toml's optional dependencies; README "What to install
where"). The base is the client and the contract; the roles are extras."""

from __future__ import annotations

from importlib.util import find_spec

from mii.errors import MIIError

EXTRAS = {
    "engine": ("torch", "transformers", "safetensors"),
    "worker": ("torch", "transformers", "safetensors", "celery"),
    "flower": ("celery", "flower"),
    "gateway": ("starlette", "uvicorn", "prometheus_client"),
    "demo": ("torch", "transformers", "gguf"),
}


class MissingExtraError(MIIError, ImportError):
    """A role's packages are not installed; the message names the extra that installs them."""


def require(extra: str, what: str) -> None:
    """Raise `MissingExtraError` unless the packages of `extra` are installed (looked up,
    not imported: torch takes seconds to import)."""
    for module in EXTRAS[extra]:
        if not _installed(module):
            raise MissingExtraError(
                f"{what} needs {module!r}, which is not installed: install mii's extra "
                f"{extra!r} (pip install '.[{extra}]' in mii's checkout; '.[all]': every role)"
            )


def _installed(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module blanked out in sys.modules
        return False
