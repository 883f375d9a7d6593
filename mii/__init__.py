"""mii: fast LLM generation, in-process or served by a Redis-streams worker fleet.

A drop-in for DeepSpeed-MII's FastGen API: `mii.pipeline`, `mii.serve`, `mii.client`.
Attributes load lazily so that `import mii.kernels` or `import mii.engine` stays light.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "pipeline": "mii.api",
    "serve": "mii.api",
    "client": "mii.api",
    "ModelConfig": "mii.config",
    "MIIConfig": "mii.config",
    "Response": "mii.response",
    "TaskType": "mii.constants",
    "DeploymentType": "mii.constants",
    "GenerationFinishReason": "mii.constants",
    "GenerateParams": "mii.params",
    "constants": "mii.constants",
    "errors": "mii.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mii' has no attribute {name!r}")
    module = import_module(_LAZY[name])
    value = module if module.__name__ == f"mii.{name}" else getattr(module, name)
    globals()[name] = value
    return value
