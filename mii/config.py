"""MII's `ModelConfig` and `MIIConfig` as pydantic models, with mii's engine options added."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mii.broker_config.settings import BrokerSettings
from mii.constants import DeploymentType, TaskType
from mii.engine.config import CacheConfig, EngineConfig, SchedulePolicy, SchedulerConfig

QUANTIZATION_MODES = {"fp8": "fp8"}
"""`quantization_mode` values and the `quantization` each means. MII's one mode, 'wf6af16'
(6-bit float weights), has no equivalent here; 'fp8' is ours."""


class _Model(BaseModel):
    # Field docstrings become descriptions: the help of `mii serve` and `mii worker` options.
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, validate_assignment=True,
        use_attribute_docstrings=True,
    )  # fmt: skip


class ModelConfig(_Model):
    """Which model to load and how (DeepSpeed-MII's field names, then mii's engine knobs)."""

    model_name_or_path: str
    """A local Hugging Face folder, a Hub name (org/model) or a short name (smollm2)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a Hub model; every worker fetches this one."""
    tokenizer: str | None = None
    """The tokenizer's folder or Hub name, when it is not the model's."""
    task: TaskType = TaskType.TEXT_GENERATION
    """Only text-generation."""
    tensor_parallel: int = Field(default_factory=lambda: int(os.getenv("WORLD_SIZE", "1")), gt=0)
    """GPUs one replica's model is split over (default: $WORLD_SIZE, else 1)."""
    quantization_mode: str | None = None
    """MII's; 'fp8' means quantization='fp8'; MII's 'wf6af16' is not supported."""
    inference_engine_config: dict[str, Any] = Field(default_factory=dict)
    """MII's ragged engine options; `state_manager.max_ragged_batch_size`,
    `state_manager.max_ragged_sequence_count` and `state_manager.max_context` are honoured."""
    torch_dist_port: int = 29500
    """MII's; no effect (ranks meet on a free port)."""
    zmq_port_number: int = 25555
    """MII's; no effect (ranks talk through torch.distributed)."""
    replica_num: int = Field(1, gt=0)
    """Worker processes (model replicas) that `mii.serve` starts."""
    replica_configs: list[dict[str, Any]] = Field(default_factory=list)
    """MII's; no effect (replicas take their GPUs from device_map)."""
    device_map: Literal["auto"] | dict[str, list[list[int]]] = "auto"
    """GPUs of each replica: 'auto' (consecutive blocks of tensor_parallel), or
    {host: [[gpu, ...] per replica]}."""
    max_length: int | None = Field(None, gt=0)
    """Largest prompt + generation the deployment accepts (defaults to the model's context)."""
    sync_debug: bool = False
    """MII's; no effect."""
    profile_model_time: bool = False
    """MII's; no effect (engine statistics are in Flower and /metrics)."""
    # mii's engine options.
    dtype: str = "auto"
    """auto (the checkpoint's on GPU, fp32 on CPU), fp32, fp16 or bf16."""
    device: str = "auto"
    """auto (CUDA when there is one), cpu, cuda or cuda:N."""
    block_size: int = Field(16, gt=0)
    """Tokens per KV-cache block."""
    max_num_batched_tokens: int | None = Field(None, gt=0)
    """SplitFuse token budget per forward pass (MII: max_ragged_batch_size, default 768)."""
    max_num_seqs: int | None = Field(None, gt=0)
    """Most requests in the engine at once (MII: max_ragged_sequence_count, default 512)."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of the GPU's memory for weights, activations and the KV cache."""
    cpu_kv_cache_gib: float = Field(1.0, gt=0)
    """KV cache size on the CPU, in GiB."""
    num_kv_blocks: int | None = Field(None, gt=0)
    """KV-cache blocks (default: as many as the memory options allow)."""
    enable_prefix_caching: bool = True
    """Share the KV blocks of common prompt prefixes."""
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = "auto"
    """auto (the model's dtype) or fp8 (= fp8_e4m3: float8 e4m3 with per-head scales
    calibrated at start-up, or the checkpoint's KV scales where it has them; twice the
    sequences in the same memory)."""
    enforce_eager: bool = False
    """No CUDA graphs."""
    schedule_policy: SchedulePolicy = SchedulePolicy.SPLITFUSE
    """splitfuse (decodes first, prompt chunks fill the budget) or prefill_first."""
    async_scheduling: bool | None = None
    """Overlap the host's scheduling with the device's step (None: on for CUDA)."""
    warm_up: bool | None = None
    """Run throwaway requests at start-up so that kernels compile before clients wait on
    them (None: on for CUDA)."""
    load_format: Literal["auto", "dummy"] = "auto"
    """'dummy': random weights of the folder's config (a model's shape without its weights)."""
    skip_tokenizer_init: bool = False
    """No tokenizer: prompts must be token ids; responses carry token ids and no text."""
    quantization: str | None = None
    """fp8: linear weights in float8 e4m3 with per-channel scales, quantized at load (GPUs
    of compute capability 8.9+; on the CPU dequantized once at load). FP8 checkpoints load
    as FP8 without it."""

    @field_validator("device_map", mode="before")
    @classmethod
    def _device_map_dict(cls, value):
        if isinstance(value, int):
            return {"localhost": [[value]]}
        if isinstance(value, list) and value and isinstance(value[0], int):
            return {"localhost": [value]}
        if isinstance(value, list) and value and isinstance(value[0], list):
            return {"localhost": value}
        return value

    @model_validator(mode="after")
    def _quantization_mode(self) -> ModelConfig:
        """MII's `quantization_mode` where it means one of ours; the rest refused."""
        if self.quantization not in (None, *QUANTIZATION_MODES.values()):
            raise ValueError(f"quantization is 'fp8' or none, not {self.quantization!r}")
        mode = self.quantization_mode
        if mode is None:
            return self
        if mode.lower() not in QUANTIZATION_MODES:
            raise ValueError(
                f"quantization_mode {mode!r} is not supported: mii runs FP8 weights "
                "(quantization='fp8', or quantization_mode='fp8') and fp32, fp16 and bf16 "
                "ones (dtype); a quantized GGUF checkpoint can be dequantized into a Hugging "
                "Face folder as the demo model is (mii/engine/demo_model.py)"
            )
        if self.quantization is None:  # (validate_assignment runs this validator again)
            self.quantization = QUANTIZATION_MODES[mode.lower()]
        return self

    def _state_manager(self, key: str):
        return self.inference_engine_config.get("state_manager", {}).get(key)

    def device_ids(self, replica: int = 0) -> tuple[int, ...] | None:
        """CUDA devices of one replica's tensor-parallel ranks: its entry of `device_map`;
        with "auto", the replica's block of `tensor_parallel` consecutive visible devices
        (None for replica 0: the engine counts from `device`'s index)."""
        tp = self.tensor_parallel
        if self.device_map == "auto":
            return None if replica == 0 else tuple(range(replica * tp, (replica + 1) * tp))
        replicas = [ids for host in self.device_map.values() for ids in host]
        if replica >= len(replicas):
            raise ValueError(f"device_map has {len(replicas)} replica(s), none for {replica}")
        ids = tuple(replicas[replica])
        if len(ids) != tp:
            raise ValueError(
                f"device_map gives replica {replica} devices {list(ids)}; "
                f"tensor_parallel={tp} needs {tp}"
            )
        return ids

    def to_engine_config(self, model_path: str | None = None, replica: int = 0) -> EngineConfig:
        """The engine's frozen config; `model_path` replaces a short name already resolved;
        `replica` picks the devices of that replica of a deployment."""
        budget = self.max_num_batched_tokens or self._state_manager("max_ragged_batch_size")
        max_seqs = self.max_num_seqs or self._state_manager("max_ragged_sequence_count")
        scheduler = SchedulerConfig(
            max_num_batched_tokens=budget or 768,
            max_num_seqs=max_seqs or 512,
            policy=self.schedule_policy,
        )
        cache = CacheConfig(
            block_size=self.block_size,
            num_blocks=self.num_kv_blocks,
            gpu_memory_utilization=self.gpu_memory_utilization,
            cpu_kv_cache_gib=self.cpu_kv_cache_gib,
            enable_prefix_caching=self.enable_prefix_caching,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        path = model_path or self.model_name_or_path
        return EngineConfig(
            model=path,
            revision=self.revision,
            tokenizer=self.tokenizer if self.tokenizer != self.model_name_or_path else path,
            dtype=self.dtype,
            device=self.device,
            max_model_len=self.max_length or self._state_manager("max_context"),
            tensor_parallel=self.tensor_parallel,
            device_ids=self.device_ids(replica),
            enforce_eager=self.enforce_eager,
            async_scheduling=self.async_scheduling,
            warm_up=self.warm_up,
            load_format=self.load_format,
            skip_tokenizer_init=self.skip_tokenizer_init,
            quantization=self.quantization,
            cache=cache,
            scheduler=scheduler,
        )


class MIIConfig(_Model):
    """A deployment: its name, its model and where its Redis is."""

    deployment_name: str = ""
    """The deployment's name (default: MODEL-mii-deployment)."""
    deployment_type: DeploymentType = DeploymentType.LOCAL
    """Only local (AML is not supported)."""
    model_conf: ModelConfig = Field(alias="model_config")
    port_number: int = 50050
    """MII's; no effect (clients reach workers through Redis)."""
    enable_restful_api: bool = False
    """Start the HTTP gateway (OpenAI API, MII's REST API) with the workers."""
    restful_api_host: str = "localhost"
    """Interface of the HTTP gateway."""
    restful_api_port: int = 51080
    """Port of the HTTP gateway."""
    restful_processes: int = Field(32, ge=1)
    """Gateway processes (at most one a core)."""
    hostfile: str = "/job/hostfile"
    """MII's; no effect (start workers on other hosts with `mii worker`)."""
    version: int = 1
    """MII's AML option; no effect."""
    instance_type: str = "Standard_NC12s_v3"
    """MII's AML option; no effect."""
    # mii's broker options.
    redis_url: str | None = None
    """Redis URL (redis://, rediss://, with user and password); None: MII_REDIS_URL or an
    embedded redis-server."""
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    """Queue limits and timings (queue depth, reclaim idle time, delivery limit, TTLs)."""

    @model_validator(mode="after")
    def _default_deployment_name(self) -> MIIConfig:
        if not self.deployment_name:
            name = os.path.basename(self.model_conf.model_name_or_path.rstrip("/"))
            self.deployment_name = f"{name}-mii-deployment"
        return self
