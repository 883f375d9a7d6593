"""The decode GEMV (kernels/gemv.py) against `gemv_ref`: 16-bit/32-bit and float8 weights,
bias, 1 to 4 rows, edges of N and K off the tiles, split-K with its arrival counters, in the
interpreter (fp32 and fp16; the gated activation folded in: fp32 and bf16, bit for bit
against the activation kernel then the GEMV) and on the GPU (bf16 at the Mistral-7B and
Mixtral TP=2 shapes, CUDA graph replays included).

The interpreter runs a grid's programs one after another, so there the last split to arrive
is always the last in grid order; the GPU tests cover arrivals in any order."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_testing import TOLERANCE, poisoned_allocations, rel_err

from mii.kernels.fp8_ref import fp8_linear_ref, quantize_rows

FP8 = torch.float8_e4m3fn
# (M, N, K): N off BLOCK_N (16), K off BLOCK_K (64) in some
SHAPES = [(1, 40, 300), (2, 48, 256), (3, 40, 320), (4, 33, 300)]
GPU_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (3072, 4096),
              (4096, 2048)]  # fmt: skip


@pytest.fixture(scope="module")
def gemv_interpreted(interpreted):
    return importlib.import_module("mii.kernels.gemv")


@pytest.fixture(scope="module")
def gemv_compiled(compiled):
    return importlib.import_module("mii.kernels.gemv")


def _operands(m, n, k, device, dtype, fp8, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed * 1000 + m * 7 + n)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 0.05
    if fp8:
        q, scale = quantize_rows(w.to(device))
    else:
        q, scale = w.to(device=device, dtype=dtype), None
    b = torch.randn(n, generator=gen).to(device=device, dtype=dtype) if bias else None
    return x, q, scale, b


def _counters(module):
    """Every cached workspace's arrival counters (kernels/split_k.py holds them)."""
    return [c for _, c in importlib.import_module("mii.kernels.split_k")._WORKSPACES.values()]


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_interpreted(gemv_interpreted, dtype, shape, fp8, split_k):
    m, n, k = shape
    x, w, scale, b = _operands(m, n, k, "cpu", dtype, fp8, bias=(m + split_k) % 2 == 0)
    tile = gemv_interpreted.GemvTile(16, 64, split_k)
    with poisoned_allocations():
        out = gemv_interpreted.gemv(x, w, scale, b, tile=tile)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, gemv_interpreted.gemv_ref(x.float(), w, scale, b)) < TOLERANCE[dtype]
    assert all(not c.any() for c in _counters(gemv_interpreted)), "a counter left non-zero"


def test_default_tile_and_strided_rows_interpreted(gemv_interpreted):
    """The default tile (one K tile, no split at this size) and x a view with a row stride."""
    x, w, scale, b = _operands(2, 24, 200, "cpu", torch.float32, True)
    wide = torch.randn(2, 333)
    wide[:, 5:205] = x
    out = gemv_interpreted.gemv(wide[:, 5:205], w, scale, b)
    assert rel_err(out, gemv_interpreted.gemv_ref(x, w, scale, b)) < TOLERANCE[torch.float32]


def test_split_k_is_reproducible_interpreted(gemv_interpreted):
    """Two calls give the same bits, each leaves every counter at 0; 5 K tiles over 3
    splits (2, 2, 1) and splits as many as the K tiles."""
    x, w, scale, b = _operands(4, 40, 300, "cpu", torch.float16, True)
    for split_k in (3, 5):
        tile = gemv_interpreted.GemvTile(16, 64, split_k)
        with poisoned_allocations():
            first = gemv_interpreted.gemv(x, w, scale, b, tile=tile)
            second = gemv_interpreted.gemv(x, w, scale, b, tile=tile)
        assert torch.equal(first.view(torch.int16), second.view(torch.int16))
        assert all(not c.any() for c in _counters(gemv_interpreted))
        partials, _ = gemv_interpreted.reserve_workspace("cpu", split_k, 4, 40, 16)
        assert partials.shape == (split_k, 4, 40)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("k", [256, 300])  # 300: a partial last K tile
def test_gated_is_the_activation_then_gemv_interpreted(
    gemv_interpreted, interpreted, activation, dtype, fp8, split_k, k
):
    """gemv(x, gated=act) has the bits of gemv(act_and_mul(x)) at one row: the same
    activation helper, the same rounding, the same sums."""
    x, w, scale, b = _operands(1, 40, 2 * k, "cpu", dtype, fp8, bias=split_k == 1)
    w = w[:, :k].contiguous()
    x = 3 * x  # the activations' curved range
    act_and_mul = getattr(interpreted.activation, f"{activation}_and_mul")
    tile = gemv_interpreted.GemvTile(16, 64, split_k)
    with poisoned_allocations():
        fused = gemv_interpreted.gemv(x, w, scale, b, tile=tile, gated=activation)
        expected = gemv_interpreted.gemv(act_and_mul(x), w, scale, b, tile=tile)
    assert fused.dtype == dtype and fused.shape == (1, 40)
    assert torch.equal(fused, expected)
    # The interpreter casts float32 to bf16 toward zero (torch to nearest): a looser bound.
    bound = 3e-2 if dtype == torch.bfloat16 else TOLERANCE[dtype]
    assert rel_err(fused, gemv_interpreted.gemv_ref(x, w, scale, b, gated=activation)) < bound
    assert all(not c.any() for c in _counters(gemv_interpreted))


def test_gated_preconditions():
    gemv = importlib.import_module("mii.kernels.gemv")
    x, w, _, _ = _operands(1, 40, 64, "cpu", torch.float32, False)
    with pytest.raises(AssertionError):
        gemv.gemv(x, w, gated="silu")  # x must be [gate | up], twice the weight's K
    with pytest.raises(AssertionError):
        gemv.gemv(torch.cat([x, x], 1), w, gated="relu")


def _every_e4m3_byte(device):
    """Weights (254, 64) float8 whose row n holds the n-th finite e4m3 value (every byte
    but the two NaNs, subnormals and both zeros included) in column 0, zeros elsewhere;
    x = [1, 0, ...]: y[n] is that value times its scale, 1."""
    codes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    w = torch.zeros(len(codes), 64, dtype=torch.uint8)
    w[:, 0] = codes
    w = w.view(FP8).to(device)
    x = torch.zeros(1, 64, device=device)
    x[0, 0] = 1.0
    return x, w, torch.ones(len(codes), device=device)


def _check_every_e4m3_byte(module, device):
    x, w, scale = _every_e4m3_byte(device)
    for split_k in (1, 2):
        out = module.gemv(x, w, scale, tile=module.GemvTile(16, 64, split_k))
        assert torch.equal(out[0], w[:, 0].float()), "an e4m3 byte decoded to another value"


def test_every_e4m3_byte_decodes_exactly_interpreted(gemv_interpreted):
    """Every finite e4m3 byte (subnormals, both zeros) is read as its value, bit for bit."""
    _check_every_e4m3_byte(gemv_interpreted, "cpu")


@pytest.mark.gpu
def test_every_e4m3_byte_decodes_exactly_gpu(gemv_compiled):
    """Compiled: subnormal weights are not flushed to zero."""
    _check_every_e4m3_byte(gemv_compiled, "cuda")


def test_reference_matches_fp8_contract():
    """gemv_ref on float8 weights is fp8_linear_ref's product, taken in float32."""
    x, q, scale, b = _operands(3, 40, 300, "cpu", torch.float32, True)
    gemv = importlib.import_module("mii.kernels.gemv")
    assert rel_err(gemv.gemv_ref(x, q, scale, b), fp8_linear_ref(x, q, scale, b)) < 1e-6


def test_preconditions():
    gemv = importlib.import_module("mii.kernels.gemv")
    x, w, scale, _ = _operands(1, 40, 64, "cpu", torch.float32, True)
    with pytest.raises(AssertionError):
        gemv.gemv(torch.randn(5, 64), w, scale)  # more than MAX_M rows
    with pytest.raises(AssertionError):
        gemv.gemv(x, w)  # float8 without its scale
    with pytest.raises(AssertionError):
        gemv.gemv(x, torch.randn(40, 64, dtype=torch.float16))  # not x's dtype
    with pytest.raises(AssertionError):
        gemv.gemv(x, torch.randn(64, 40).t())  # weight rows not dense
    assert gemv.gemv_supported(x, w) and not gemv.gemv_supported(torch.randn(5, 64), w)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("itemsize", [1, 2, 4])
def test_tile_choice(m, itemsize):
    """Every split starts inside K; narrow outputs split K until the grid holds a few
    programs per SM; K tiles span TILE_ROW_BYTES of a weight row."""
    gemv = importlib.import_module("mii.kernels.gemv")
    for n, k in [*GPU_SHAPES, (14336, 4096), (4096, 7168), (40, 300), (8, 16)]:
        t = gemv.gemv_tile(m, n, k, itemsize, sms=130)  # the rule (no measured tiles)
        k_tiles = -(-k // t.block_k)
        per_split = -(-k_tiles // t.split_k)
        assert 1 <= t.split_k <= k_tiles and (t.split_k - 1) * per_split < k_tiles
        assert t.block_k * itemsize <= gemv.TILE_ROW_BYTES
        programs = -(-n // t.block_n) * t.split_k
        assert programs >= min(4 * 130, -(-n // t.block_n) * k_tiles)


def test_measured_tiles_replace_the_rule_at_one_row_on_their_sm_count(monkeypatch):
    gemv = importlib.import_module("mii.kernels.gemv")
    table = dict(gemv.MEASURED_TILES)
    on_114 = {key: gemv.gemv_tile(1, *key, sms=114) for key in table}
    monkeypatch.setattr(gemv, "MEASURED_TILES", {})
    assert on_114 == {key: gemv.gemv_tile(1, *key, sms=114) for key in table}  # the rule
    rule = {key: gemv.gemv_tile(1, *key, sms=gemv.MEASURED_SMS) for key in table}
    monkeypatch.setattr(gemv, "MEASURED_TILES", table)
    for (n, k, itemsize), tile in table.items():
        assert gemv.gemv_tile(1, n, k, itemsize, sms=gemv.MEASURED_SMS) == tile
        assert tile != rule[n, k, itemsize]
        assert gemv.gemv_tile(2, n, k, itemsize, sms=gemv.MEASURED_SMS) != tile  # one row only
        k_tiles = -(-k // tile.block_k)
        assert tile.block_k * itemsize <= gemv.TILE_ROW_BYTES and k_tiles % tile.split_k == 0


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("fp8", [False, True])
def test_matches_reference_gpu(gemv_compiled, fp8, shape, m):
    n, k = shape
    x, w, scale, b = _operands(m, n, k, "cuda", torch.bfloat16, fp8, bias=m % 2 == 1)
    expected = gemv_compiled.gemv_ref(x.float(), w, scale, b)
    with poisoned_allocations():
        out = gemv_compiled.gemv(x, w, scale, b)
        again = gemv_compiled.gemv(x, w, scale, b)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert rel_err(out, expected) < TOLERANCE[torch.bfloat16]
    assert torch.equal(out.view(torch.int16), again.view(torch.int16))
    torch.cuda.synchronize()
    assert all(not c.any() for c in _counters(gemv_compiled))


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [1, 2, 7, 28])
def test_split_k_gpu(gemv_compiled, split_k):
    x, w, scale, b = _operands(3, 4096, 14336, "cuda", torch.bfloat16, True)
    tile = gemv_compiled.GemvTile(16, 512, split_k)
    out = gemv_compiled.gemv(x, w, scale, b, tile=tile)
    assert rel_err(out, gemv_compiled.gemv_ref(x.float(), w, scale, b)) < 1e-2
    for _ in range(3):
        assert torch.equal(out, gemv_compiled.gemv(x, w, scale, b, tile=tile))


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("m", [1, 4])
def test_cuda_graph_replays_gpu(gemv_compiled, fp8, m):
    """Captured (workspace allocated by the eager warm-up), replayed twice: the same bits as
    eager calls each time, counters back at 0."""
    x, w, scale, b = _operands(m, 4096, 4096, "cuda", torch.bfloat16, fp8, seed=1)
    eager = gemv_compiled.gemv(x, w, scale, b)
    assert gemv_compiled.gemv_tile(m, 4096, 4096, w.element_size()).split_k > 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv_compiled.gemv(x, w, scale, b)
        out2 = gemv_compiled.gemv(x, w, scale, b)  # twice in one graph: counters reset
    for _ in range(2):
        out.zero_()
        out2.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager) and torch.equal(out2, eager)
        assert all(not c.any() for c in _counters(gemv_compiled))
    x.copy_(torch.randn_like(x))  # new inputs in place: the replay follows them
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, gemv_compiled.gemv(x, w, scale, b))


def _check_deferred(module, x, w, scale, b, tile=None):
    """gemv(defer=True) where the tile splits K: the SplitSums whose total has the bits of
    the GEMV's own epilogue; without a split, y itself."""
    with poisoned_allocations():
        stored = module.gemv(x, w, scale, b, tile=tile)
        deferred = module.gemv(x, w, scale, b, tile=tile, defer=True)
    split = (tile or module.gemv_tile(x.shape[0], w.shape[0], w.shape[1], w.element_size(),
                                      module._sm_count(x.device))).split_k  # fmt: skip
    if split == 1:
        assert isinstance(deferred, torch.Tensor) and torch.equal(deferred, stored)
        return
    assert isinstance(deferred, module.SplitSums)
    assert deferred.partials.shape == (split, *stored.shape) and deferred.shape == stored.shape
    assert torch.equal(deferred.total(), stored)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("fp8", [False, True])
def test_deferred_split_sums_interpreted(gemv_interpreted, fp8, split_k):
    x, w, scale, b = _operands(2, 40, 300, "cpu", torch.float32, fp8, bias=fp8)
    _check_deferred(gemv_interpreted, x, w, scale, b, gemv_interpreted.GemvTile(16, 64, split_k))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("fp8", [False, True])
def test_deferred_split_sums_gpu(gemv_compiled, fp8, shape):
    x, w, scale, b = _operands(1, *shape, "cuda", torch.bfloat16, fp8, bias=not fp8)
    _check_deferred(gemv_compiled, x, w, scale, b)
