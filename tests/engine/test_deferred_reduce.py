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
from mii.kernels.torch_ref import Pushed


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

    gemv_push = "push buffers"

    def add_norm(self, x, residual, weight, eps, pushed=False):
        self.calls.append(
            (x, residual, weight, eps, pushed) if pushed else (x, residual, weight, eps)
        )
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


def test_rows_a_gemv_pushed_go_to_the_peer_norm_as_pushed():
    """A `Pushed` projection output (its GEMV sent it to the peers) is finished by the peer
    path's norm, told so."""
    y, residual = torch.randn(1, 8), torch.randn(1, 8)
    peer = Peer(fits=True)
    tp = dataclasses.replace(SINGLE, peer=peer)
    norm = _norm()
    assert norm.after_all_reduce(Pushed(y, None), residual, tp) == ("normed", "residual")
    assert peer.calls == [(y, residual, norm.weight, 1e-5, True)]


@pytest.mark.parametrize("offer", [True, False], ids=["buffers", "none"])
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma-norm"])
def test_row_parallel_projections_push_where_the_peer_offers_buffers(offer, unit_offset):
    """The output and down projections whose partial sums go to a norm's after_all_reduce
    take the peer path's GEMV push buffers (`LinearBase.push_to`), unless the norm has
    Gemma's unit offset (the peer norm does not take it) or the peer offers none."""
    from transformers import LlamaConfig

    from mii.engine.models.family import Family
    from mii.engine.models.llama import LlamaDecoderLayer, LlamaModel

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)  # fmt: skip
    peer = Peer(fits=True)
    peer.gemv_push = "push buffers" if offer else None
    fam = dataclasses.replace(Family.of(cfg), gemma_norm=unit_offset)
    model = LlamaModel(cfg, fam, dataclasses.replace(SINGLE, peer=peer), LlamaDecoderLayer)
    want = "push buffers" if offer and not unit_offset else None
    for layer in model.layers:
        assert layer.self_attn.o_proj.push_to == want
        assert layer.mlp.down_proj.push_to == want
        assert layer.self_attn.qkv_proj.push_to is None and layer.mlp.gate_up_proj.push_to is None


def test_without_a_peer_nothing_pushes():
    from transformers import LlamaConfig

    from mii.engine.models.family import Family
    from mii.engine.models.llama import LlamaDecoderLayer, LlamaModel

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)  # fmt: skip
    model = LlamaModel(cfg, Family.of(cfg), SINGLE, LlamaDecoderLayer)
    assert all(layer.self_attn.o_proj.push_to is None and layer.mlp.down_proj.push_to is None
               for layer in model.layers)  # fmt: skip
