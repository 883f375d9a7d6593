"""Programmatic dependent launch (kernels/pdl.py): when it is on, and on the GPU a decode
layer's chain of kernels launched with it, captured in a CUDA graph and replayed, gives the
bits of the same chain launched without it (each kernel waits for the one before, so the
early starts may change no result)."""

from __future__ import annotations

import pytest
import torch

from mii.kernels.pdl import pdl_args, pdl_on


def test_pdl_is_off_on_the_cpu_and_under_mii_pdl_0(monkeypatch):
    monkeypatch.delenv("MII_PDL", raising=False)
    assert not pdl_on(torch.zeros(1))
    assert pdl_args(torch.zeros(1)) == {"PDL": False}  # no launch option for the interpreter
    if torch.cuda.is_available():
        capable = torch.cuda.get_device_capability()[0] >= 9
        assert pdl_on(torch.zeros(1, device="cuda")) == capable
        if capable:
            assert pdl_args(torch.zeros(1, device="cuda")) == {"PDL": True, "launch_pdl": True}
        monkeypatch.setenv("MII_PDL", "0")
        assert not pdl_on(torch.zeros(1, device="cuda"))
        assert pdl_args(torch.zeros(1, device="cuda")) == {"PDL": False}


def _layer(kernels, x, residual, weights):
    """One decode layer's kernels at batch 1, the attention left out: norm, QKV GEMV (split
    K), output GEMV, norm, gate_up GEMV, down GEMV with the activation folded in."""
    from mii.kernels.gemv import gemv

    norm_w, qkv, o, norm2_w, gate_up, down = weights
    h, residual = kernels.rms_norm.rms_norm(x, norm_w, 1e-5, residual)
    q = gemv(h, qkv)[:, : o.shape[1]].contiguous()
    a, residual = kernels.rms_norm.rms_norm(gemv(q, o), norm2_w, 1e-5, residual)
    return gemv(gemv(a, gate_up), down, gated="silu"), residual


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs a Hopper GPU",
)
def test_pdl_chain_in_a_graph_gives_the_bits_without_it_gpu(compiled, monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden, inner, layers = 1024, 3584, 4

    def rand(*shape, scale=0.05):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).bfloat16()

    weights = [
        (rand(hidden, scale=1) + 1, rand(3 * hidden, hidden), rand(hidden, hidden),
         rand(hidden, scale=1) + 1, rand(2 * inner, hidden), rand(hidden, inner))
        for _ in range(layers)
    ]  # fmt: skip
    x0, r0 = rand(1, hidden, scale=1), rand(1, hidden, scale=1)

    def forward(x, residual):
        for w in weights:
            x, residual = _layer(compiled, x, residual, w)
        return x, residual

    monkeypatch.setenv("MII_PDL", "0")
    expected = forward(x0, r0)
    monkeypatch.setenv("MII_PDL", "1")
    assert pdl_on(x0)
    eager = forward(x0, r0)  # also allocates the GEMV workspaces before the capture
    assert all(torch.equal(a, b) for a, b in zip(eager, expected, strict=True))
    x, residual = x0.clone(), r0.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward(x, residual)
    for _ in range(3):
        for t in out:
            t.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(out, expected, strict=True))
    x.copy_(rand(1, hidden, scale=1))  # new inputs in place: the replay follows them
    graph.replay()
    monkeypatch.setenv("MII_PDL", "0")
    again = forward(x, residual)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))
