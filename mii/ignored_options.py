"""DeepSpeed-MII options that have no effect here. They are accepted, so that MII's calls
run unchanged; one set to anything but its default is named in a warning, once per
process (Python's warning registry shows each message once per call site)."""

from __future__ import annotations

import warnings

from mii.config import MIIConfig, ModelConfig
from mii.constants import DeploymentType

MODEL_OPTIONS = {
    "torch_dist_port": "tensor-parallel ranks meet on a free loopback port (the processes of "
    "a launcher on its MASTER_PORT)",
    "zmq_port_number": "tensor-parallel ranks talk through torch.distributed, not ZeroMQ",
    "replica_configs": "replicas take their GPUs from device_map; on other hosts start "
    "workers with `mii worker --deployment NAME`",
    "sync_debug": "no extra synchronisation points exist to insert; set "
    "CUDA_LAUNCH_BLOCKING=1 to debug CUDA errors",
    "profile_model_time": "engine statistics (tokens/s, steps) are in `celery inspect "
    "mii_stats`, Flower and the workers' /metrics",
}
DEPLOYMENT_OPTIONS = {
    "port_number": "clients reach workers through Redis streams, not a gRPC load balancer",
    "hostfile": "mii.serve starts workers on this host; on other hosts start them with "
    "`mii worker --deployment NAME` against the same Redis",
    "version": "it is an AML option; AML deployments are not supported",
    "instance_type": "it is an AML option; AML deployments are not supported",
}


class IgnoredOptionWarning(UserWarning):
    """An option of DeepSpeed-MII's that mii accepts but does not use."""


def warn_ignored(config: ModelConfig | MIIConfig) -> None:
    """Warn of each ignored option set to something other than its default; refuse what
    cannot be honoured at all (an AML deployment)."""
    if isinstance(config, MIIConfig):
        if config.deployment_type != DeploymentType.LOCAL:
            raise ValueError(
                f"deployment_type {config.deployment_type.value!r} is not supported: mii "
                "serves local deployments, and workers on any number of hosts join one "
                "through its Redis (`mii worker`, docker-compose.yml)"
            )
        _warn(config, DEPLOYMENT_OPTIONS)
        config = config.model_conf
    _warn(config, MODEL_OPTIONS)


def _warn(config, options: dict[str, str]) -> None:
    for name, why in options.items():
        default = type(config).model_fields[name].get_default(call_default_factory=True)
        if getattr(config, name) != default:
            warnings.warn(f"{name} has no effect in mii: {why}", IgnoredOptionWarning,
                          stacklevel=4)  # fmt: skip
