"""Dispatch: torch references for CPU tensors (without importing triton), Triton on CUDA
unless MII_DISABLE_TRITON=1."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from kernel_testing import TOLERANCE, make_paged_batch, rel_err

from mii.kernels import dispatch, torch_ref

CPU_CALLS = """
    import sys
    import torch
    from mii.kernels import dispatch

    x = torch.randn(3, 64)
    dispatch.rms_norm(x, torch.ones(64), 1e-6, x)
    dispatch.silu_and_mul(x)
    q, k, v = torch.randn(2, 4, 64), torch.randn(2, 2, 64), torch.randn(2, 2, 64)
    cache = torch.zeros(2, 16, 2, 64)
    pos, slots = torch.tensor([0, 1]), torch.tensor([0, 1])
    dispatch.rope_kv_write(q, k, v, pos, torch.randn(8, 64), cache, cache.clone(), slots)
    tables, lens = torch.zeros(2, 1, dtype=torch.int32), torch.tensor([1, 2], dtype=torch.int32)
    starts = torch.tensor([0, 1, 2], dtype=torch.int32)
    dispatch.paged_attention(q, cache, cache, tables, starts, lens, 0.1, max_query_len=1)
    dispatch.decode_attention(q, cache, cache, tables, lens, 0.1)
    assert not dispatch.fp8_rows_wanted(x, torch.zeros(8, 64, dtype=torch.float8_e4m3fn))
    assert "triton" not in sys.modules, "CPU dispatch imported triton"
"""


@pytest.mark.timeout(120)
def test_cpu_dispatch_never_imports_triton():
    subprocess.run([sys.executable, "-c", textwrap.dedent(CPU_CALLS)], check=True)


def test_cpu_decode_attention_is_the_reference_with_unit_queries():
    batch = make_paged_batch([1, 1, 1], [3, 20, 40], 8, 2, 64, dtype=torch.float32, device="cpu")
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables)
    out = dispatch.decode_attention(*args, batch.seq_lens, batch.scale)
    expected = torch_ref.paged_attention_ref(
        *args, batch.query_start_loc, batch.seq_lens, batch.scale
    )
    assert torch.equal(out, expected)


@pytest.mark.gpu
def test_cuda_tensors_take_triton_unless_disabled(compiled, monkeypatch):
    x = torch.randn(4, 64, device="cuda")
    calls = []
    monkeypatch.setattr(compiled.activation, "silu_and_mul", lambda t: calls.append("triton"))
    monkeypatch.setattr(torch_ref, "silu_and_mul_ref", lambda t: calls.append("torch"))
    dispatch.silu_and_mul(x)
    monkeypatch.setenv("MII_DISABLE_TRITON", "1")
    dispatch.silu_and_mul(x)
    assert calls == ["triton", "torch"]


@pytest.mark.gpu
def test_fp8_rows_are_wanted_where_a_w8a8_gemm_quantizes_them(compiled, monkeypatch):
    weight = torch.zeros(512, 4096, dtype=torch.float8_e4m3fn, device="cuda")
    rows = {m: torch.zeros(m, 4096, dtype=torch.bfloat16, device="cuda") for m in (1, 16, 300)}
    assert not dispatch.fp8_rows_wanted(rows[1], weight)  # the GEMV takes x as it is
    assert dispatch.fp8_rows_wanted(rows[16], weight)  # Triton W8A8
    assert dispatch.fp8_rows_wanted(rows[300], weight)  # _scaled_mm
    assert not dispatch.fp8_rows_wanted(rows[300].float(), weight)  # weight-only Triton
    monkeypatch.setenv("MII_FP8_NORM_QUANT", "0")
    assert not dispatch.fp8_rows_wanted(rows[300], weight)


@pytest.mark.gpu
@pytest.mark.parametrize("seq_lens", [[5, 300, 4097], [2000]])
def test_decode_steps_match_the_reference_through_dispatch(compiled, seq_lens):
    batch = make_paged_batch(
        [1] * len(seq_lens), seq_lens, 32, 8, 128, dtype=torch.bfloat16, device="cuda"
    )
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.query_start_loc)
    out = dispatch.paged_attention(*args, batch.seq_lens, batch.scale, max_query_len=1)
    expected = torch_ref.paged_attention_ref(*args, batch.seq_lens, batch.scale)
    assert rel_err(out, expected) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_decode_steps_replay_in_a_cuda_graph_with_new_lengths(compiled):
    """The engine captures decode steps once and replays them as contexts grow: the
    launch must not depend on the lengths' values."""
    batch = make_paged_batch(
        [1] * 4, [4000, 10, 300, 1], 32, 8, 128, dtype=torch.bfloat16, device="cuda"
    )
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.query_start_loc)
    seq_lens = batch.seq_lens.clone()

    def step():
        return dispatch.paged_attention(*args, seq_lens, batch.scale, max_query_len=1)

    step()  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for lens in ([4000, 10, 300, 1], [17, 3000, 64, 900]):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        expected = torch_ref.paged_attention_ref(*args, seq_lens, batch.scale)
        assert rel_err(out, expected) < TOLERANCE[torch.bfloat16]
