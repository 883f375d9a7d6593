"""Linear layers that shard their weights across a tensor-parallel group.

Each parameter carries a `weight_loader(param, loaded, shard_id)` that copies this rank's
slice of a checkpoint weight into place, so a rank reads only what it keeps. `loaded` is a
tensor or a lazy safetensors slice: loaders only index it (`[a:b]`, `[:, a:b]`, `[...]`).
"""

from __future__ import annotations

import torch
from torch import nn

from mii.engine.layers.linear_method import UNQUANTIZED, LinearMethod
from mii.engine.tp.context import ParallelContext


def _param(shape: tuple[int, ...], loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape), requires_grad=False)
    p.weight_loader = loader
    return p


class LinearBase(nn.Module):
    """x @ weight.T (+ bias), as the layer's `method` stores and multiplies the weight
    (layers/linear_method.py: unquantized unless a quantization gave it another)."""

    weight: nn.Parameter
    packed: torch.Tensor | None = None
    method: LinearMethod = UNQUANTIZED
    defer_splits = False
    """Set by a model whose next kernel after this layer is an RMSNorm: a one-row GEMV's
    output may then come as its split-K partial sums, which the norm adds up
    (kernels/gemv.py `SplitSums`)."""
    push_to = None
    """Push buffers of the group (kernels/all_reduce.py `PeerBuffers`), set by a model on a
    row-parallel projection whose partial sums go to `RMSNorm.after_all_reduce`: a one-row
    GEMV sends its rows to the peers as it stores them and returns them as `Pushed`; the
    norm finishes the all-reduce."""

    @property
    def output_loader(self):
        """The loader of a vector over the output features (the bias, per-channel scales),
        sharded as the weight's rows are."""
        return self._load

    def pack_for_cpu(self, batch_hint: int) -> None:
        self.method.pack_for_cpu(self, batch_hint)

    def matmul(
        self, x: torch.Tensor, bias: torch.Tensor | None, gated: str | None = None
    ) -> torch.Tensor:
        """`gated`: x is a gated MLP's [gate | up] and `gated` its activation's name
        (`LinearMethod.apply_gated`)."""
        if gated is None:
            return self.method.apply(self, x, bias)
        return self.method.apply_gated(self, x, bias, gated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def takes_quantized_rows(self, x: torch.Tensor) -> bool:
        """Whether this layer takes x's per-token quantized rows in place of x
        (`LinearMethod.takes_quantized_rows`): the RMSNorm before it then makes them."""
        return self.method.takes_quantized_rows(self, x)


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = _param((out_features, in_features), self._load)
        self.bias = _param((out_features,), self._load) if bias else None

    @staticmethod
    def _load(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(loaded[...])


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W's output rows split across ranks; output stays sharded."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp: ParallelContext
    ) -> None:
        super().__init__()
        self.tp = tp
        self.out_per_rank = tp.shard(out_features, "output features")
        self.weight = _param((self.out_per_rank, in_features), self._load)
        self.bias = _param((self.out_per_rank,), self._load) if bias else None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        start = self.tp.rank * self.out_per_rank
        param.data.copy_(loaded[start : start + self.out_per_rank])


def load_fused(load, param: nn.Parameter, loaded, parts: list[tuple[object, int]]) -> None:
    """Load a checkpoint weight that already fuses several parts (Phi-3's qkv_proj and
    gate_up_proj), each through the loader of one part: `parts` are (shard id, rows)."""
    start = 0
    for shard_id, rows in parts:
        load(param, loaded[start : start + rows], shard_id)
        start += rows


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate and up projections)."""

    def __init__(self, in_features: int, sizes: list[int], bias: bool, tp: ParallelContext):
        self.sizes = sizes
        super().__init__(in_features, sum(sizes), bias, tp)

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None) -> None:
        if shard_id is None:
            load_fused(self._load, param, loaded, list(enumerate(self.sizes)))
            return
        size = self.sizes[shard_id] // self.tp.world_size
        offset = sum(self.sizes[:shard_id]) // self.tp.world_size
        start = self.tp.rank * size
        param.data.narrow(0, offset, size).copy_(loaded[start : start + size])


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projections; heads split across ranks, KV heads replicated when fewer
    KV heads than ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        tp: ParallelContext,
    ) -> None:
        self.head_dim = head_dim
        self.num_heads = tp.shard(num_heads, "attention heads")
        if num_kv_heads >= tp.world_size:
            self.num_kv_heads = tp.shard(num_kv_heads, "KV heads")
            self.kv_replicas = 1
        elif tp.world_size % num_kv_heads == 0:
            self.num_kv_heads = 1
            self.kv_replicas = tp.world_size // num_kv_heads
        else:
            raise ValueError(
                f"tensor_parallel={tp.world_size} neither divides nor is a multiple of the "
                f"{num_kv_heads} KV heads"
            )
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.world_size
        self.checkpoint_rows = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim}
        self.checkpoint_rows["v"] = self.checkpoint_rows["k"]
        super().__init__(hidden_size, out, bias, tp)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        if shard_id is None:  # q, k and v fused in the checkpoint, in this order
            load_fused(self._load, param, loaded, list(self.checkpoint_rows.items()))
            return
        if shard_id == "q":
            offset, size, index = 0, self.q_size, self.tp.rank
        else:
            size, index = self.kv_size, self.tp.rank // self.kv_replicas
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
        param.data.narrow(0, offset, size).copy_(loaded[index * size : (index + 1) * size])


class RowParallelLinear(LinearBase):
    """y = x W^T with W's input columns split across ranks; partial sums all-reduced."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp: ParallelContext
    ) -> None:
        super().__init__()
        self.tp = tp
        self.in_per_rank = tp.shard(in_features, "input features")
        self.weight = _param((out_features, self.in_per_rank), self._load)
        self.bias = _param((out_features,), self._load_bias) if bias else None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        start = self.tp.rank * self.in_per_rank
        param.data.copy_(loaded[:, start : start + self.in_per_rank])

    @property
    def output_loader(self):
        return self._load_bias  # every rank holds all output features

    @staticmethod
    def _load_bias(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(loaded[...])

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """`reduce=False`: this rank's partial sums, for the caller to all-reduce (with the
        norm after it: `RMSNorm.after_all_reduce`); only without a bias."""
        return self._reduce(self.matmul(x, None), reduce)

    def forward_gated(self, x: torch.Tensor, activation: str, reduce: bool = True) -> torch.Tensor:
        """forward(act_and_mul(x)) for a gated MLP's down projection: x (T, 2 * in_per_rank)
        is this rank's [gate | up] (MergedColumnParallelLinear's shard), `activation` the
        gated activation's name. The linear method may fold the activation into its GEMV
        (one row on the GPU: `LinearMethod.apply_gated`)."""
        return self._reduce(self.matmul(x, None, gated=activation), reduce)

    def _reduce(self, partial: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        assert not reduce or self.push_to is None, "a pushing layer's caller reduces"
        if not reduce:
            assert self.bias is None, "a bias joins after the reduction"
            return partial
        y = self.tp.all_reduce(partial)
        # The bias joins after the reduction so that it is added once, not once per rank.
        return y if self.bias is None else y + self.bias
