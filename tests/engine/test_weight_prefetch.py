"""Weights prefetched into L2 between one-row products (mii/engine/layers/weight_prefetch.py):
which projection prefetches which, that it stays off on the CPU, and on a GPU that it
changes no token."""

from __future__ import annotations

import pytest
import torch
from test_tensor_parallel import GREEDY, pipeline
from tiny_models import mixed_prompts

from mii.engine.layers import weight_prefetch
from mii.engine.layers.linear import LinearBase


def _runner(pipe):
    return pipe.engine.runner


@pytest.mark.timeout(120)
def test_each_projection_prefetches_the_next_one_that_runs(tiny_model, monkeypatch):
    monkeypatch.setenv("MII_L2_PREFETCH_BYTES", str(1 << 20))
    with pipeline(tiny_model("llama3"), device="cpu") as pipe:
        model = _runner(pipe).model
        assert _runner(pipe).weight_prefetch is None  # CUDA only
        pairs = weight_prefetch.successors(model)
    layers = model.model.layers
    expected = []
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        expected += [(attn.qkv_proj, attn.o_proj), (attn.o_proj, mlp.gate_up_proj)]
        if i + 1 < len(layers):
            expected.append((mlp.down_proj, layers[i + 1].self_attn.qkv_proj))
    assert [(id(a), id(b)) for a, b in pairs] == [(id(a), id(b)) for a, b in expected]
    assert all(isinstance(m, LinearBase) for pair in pairs for m in pair)

    class Recorder:  # stands in for the side stream: what the products ask of it
        def __init__(self):
            self.calls = []

        def join(self):
            self.calls.append("join")

        def start(self, x, weight):
            self.calls.append(weight.data_ptr())

    recorder = Recorder()
    weight_prefetch.link(model, pairs, recorder)
    with torch.inference_mode():
        model.model.layers[0].mlp(
            torch.randn(1, model.model.layers[0].mlp.gate_up_proj.weight.shape[1])
        )
    first, second = layers[0].mlp, layers[1].self_attn
    # down starts the next layer's QKV; nothing joins before the model's forward ends
    assert recorder.calls == [second.qkv_proj.weight.data_ptr()]
    assert first.down_proj.prefetch_next.data_ptr() == second.qkv_proj.weight.data_ptr()


def test_a_model_without_llama_layers_gets_no_pairs():
    assert weight_prefetch.successors(torch.nn.Linear(4, 4)) == []


# ---- on a GPU ----------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_gpu_l2_prefetch_leaves_the_tensor_as_it_was():
    from mii.kernels.l2_prefetch import CHUNK_BYTES, l2_prefetch, prefetch_chunks

    w = torch.randn(3000, 1024, device="cuda", dtype=torch.bfloat16)
    before = w.clone()
    assert prefetch_chunks(w, 1 << 30) == w.numel() * 2 // CHUNK_BYTES
    assert prefetch_chunks(w, CHUNK_BYTES - 1) == 0
    l2_prefetch(w, 1 << 30)
    l2_prefetch(w, 5 * CHUNK_BYTES + 7)
    torch.cuda.synchronize()
    assert torch.equal(w, before)


@pytest.mark.timeout(240)
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch", ["llama3", "mixtral"])
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_gpu_prefetch_changes_no_token(tiny_model, monkeypatch, arch, eager):
    path = tiny_model(arch)
    prompts = mixed_prompts(4, (1, 17, 70, 5), seed=2)
    opts = dict(device="cuda", dtype="bfloat16", max_num_batched_tokens=64, enforce_eager=eager)
    outputs = []
    for setting in ("0", str(1 << 20)):
        monkeypatch.setenv("MII_L2_PREFETCH_BYTES", setting)
        with pipeline(path, **opts) as pipe:
            assert (_runner(pipe).weight_prefetch is None) == (setting == "0")
            one = pipe(prompts[:1], max_new_tokens=24, min_new_tokens=24, **GREEDY)  # batch 1
            many = pipe(prompts, max_new_tokens=12, min_new_tokens=12, **GREEDY)
            outputs.append([r.token_ids for r in one + many])
    assert outputs[1] == outputs[0]
