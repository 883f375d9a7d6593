"""The row-parallel projections' all-reduces left to the norms after them
(`RMSNorm.after_all_reduce`, models/llama.py): which layers leave theirs, and where the
one-shot peer path takes the reduce and the norm in one call."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_tensor_parallel import pipeline

from mii.engine.layers.norm import RMSNorm
from mii.engine.tp.context import SINGLE


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arch", ["llama3", "mixtral"])
def test_each_mlp_leaves_its_reduce_to_the_next_norm(tiny_model, arch):
    with pipeline(tiny_model(arch), device="cpu") as pipe:
        model = pipe.engine.runner.model.model
    layers = list(model.layers)
    dense = arch == "llama3"  # Mixtral's experts reduce their own sums (top-k folded in)
    assert [layer.partial_out for layer in layers] == [dense] * len(layers)
    assert [layer.partial_in for layer in layers] == [False] + [dense] * (len(layers) - 1)
    assert model.partial_final == dense
    assert all(layer.attn_partial for layer in layers)


class Peer:
    """Stands in for a PeerAllReduce: takes what `fits_norm` admits, records the call."""

    def __init__(self, fits: bool):
        self.fits, self.calls = fits, []

    def fits_norm(self, x, residual, weight):
        return self.fits

    def add_norm(self, x, residual, weight, eps):
        self.calls.append((x, residual, weight, eps))
        return "normed", "residual"


def _norm(unit_offset=False):
    norm = RMSNorm(8, 1e-5, unit_offset)
    norm.weight.data = torch.linspace(0.5, 1.5, 8)
    return norm


def test_a_norm_after_an_all_reduce_takes_the_peer_path_where_it_fits():
    x, residual = torch.randn(2, 8), torch.randn(2, 8)
    peer = Peer(fits=True)
    tp = dataclasses.replace(SINGLE, peer=peer)
    norm = _norm()
    assert norm.after_all_reduce(x, residual, tp) == ("normed", "residual")
    assert peer.calls == [(x, residual, norm.weight, 1e-5)]


@pytest.mark.parametrize("why", ["does not fit", "Gemma's unit offset", "no residual", "no peer"])
def test_otherwise_it_is_the_norm_of_the_all_reduce(why):
    x, residual = torch.randn(2, 8), torch.randn(2, 8)
    peer = Peer(fits=why != "does not fit")
    tp = SINGLE if why == "no peer" else dataclasses.replace(SINGLE, peer=peer)
    norm = _norm(unit_offset=why == "Gemma's unit offset")
    residual = None if why == "no residual" else residual
    got = norm.after_all_reduce(x, residual, tp)
    want = norm(x, residual)  # one rank: the all-reduce leaves x as it is
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert peer.calls == []
