"""Vocabulary-parallel token embedding and LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mii.engine.layers.cpu_linear import pack_weight, packed_linear
from mii.engine.tp.context import ParallelContext


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary (padded to divide evenly)."""

    def __init__(self, vocab_size: int, dim: int, tp: ParallelContext) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp.world_size)
        self.start = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim), requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        rows = max(0, min(self.per_rank, self.vocab_size - self.start))
        if rows:
            param.data[:rows].copy_(loaded[self.start : self.start + rows])
        param.data[rows:].zero_()  # padding rows: the vocabulary does not divide evenly

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the vocabulary slice of each rank, gathered to the full vocabulary."""

    def __init__(self, vocab_size: int, dim: int, tp: ParallelContext, bias: bool = False):
        super().__init__(vocab_size, dim, tp)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.per_rank), requires_grad=False)
            self.bias.weight_loader = self._load
        self.packed: torch.Tensor | None = None

    def pack_for_cpu(self, batch_hint: int) -> None:
        self.packed = pack_weight(self.weight, batch_hint)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            logits = packed_linear(hidden, self.packed, self.bias)
        else:
            logits = F.linear(hidden, self.weight, self.bias)
        return self.tp.all_gather_last_dim(logits)[..., : self.vocab_size]
