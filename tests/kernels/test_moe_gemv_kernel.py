"""The decode-size MoE GEMVs (kernels/moe_gemv.py) against `expert_gemv_ref` and against
the grouped GEMMs of kernels/fused_moe.py (`expert_gemms(..., sum_top_k=False)`) on the
same routing: 16-bit/32-bit and float8 experts, 1 to 3 tokens, top-1/2/4 of 8 experts, H
and I off the tiles, split-K with its arrival counters, in the interpreter (fp32 and fp16);
on the GPU bf16 and float8 at the Mixtral TP=2 shape, CUDA graph replays included.

The interpreter runs a grid's programs one after another, so there the last split to arrive
is always the last in grid order; the GPU tests cover arrivals in any order."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_testing import TOLERANCE, poisoned_allocations, rel_err

from mii.kernels.fused_moe_ref import Routing, fused_moe_ref, quantize_experts, route_ref

FP8 = torch.float8_e4m3fn
HIDDEN, INNER, EXPERTS = 96, 48, 8  # off the test tiles below: partial column and K tiles


@pytest.fixture(scope="module")
def gemv_interpreted(interpreted):
    return importlib.import_module("mii.kernels.moe_gemv")


@pytest.fixture(scope="module")
def moe_interpreted(interpreted):
    return importlib.import_module("mii.kernels.fused_moe")


@pytest.fixture(scope="module")
def gemv_compiled(compiled):
    return importlib.import_module("mii.kernels.moe_gemv")


@pytest.fixture(scope="module")
def moe_compiled(compiled):
    return importlib.import_module("mii.kernels.fused_moe")


def small_tiles(module, split_k, block_k=None):
    """gate_up 32 rows x 64 (I=48: 1.5 column tiles; H=96: 1.5 K tiles), down 64 rows x 32
    (H=96: 1.5 column tiles; I=48: 1.5 K tiles); `block_k` narrows both."""
    t = module.GemvTile
    return module.ExpertGemvTiles(
        t(32, block_k or 64, split_k, 4, 1), t(64, block_k or 32, split_k, 4, 1)
    )


def make_layer(tokens, hidden, inner, experts, *, dtype, device, fp8=False, seed=0):
    """x, router logits, gate_up, down, scales (None unless fp8)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen)

    x = rand(tokens, hidden).to(device=device, dtype=dtype)
    logits = rand(tokens, experts, scale=2.0).to(device=device, dtype=dtype)
    gate_up = rand(experts, 2 * inner, hidden, scale=hidden**-0.5).to(device=device, dtype=dtype)
    down = rand(experts, hidden, inner, scale=inner**-0.5).to(device=device, dtype=dtype)
    if not fp8:
        return x, logits, gate_up, down, None
    (q_gate_up, gate_up_scale), (q_down, down_scale) = map(quantize_experts, (gate_up, down))
    return x, logits, q_gate_up, q_down, (gate_up_scale, down_scale)


def _counters(module):
    """Every cached arrival counter (the expert GEMV keeps its workspaces in gemv's cache)."""
    return [c for _, c in importlib.import_module("mii.kernels.split_k")._WORKSPACES.values()]


def mismatched(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The fraction of elements whose bits differ. With 16-bit results, where only the
    float32 summation order differs, a few; a rounding step left out or added moves a
    quarter to a half of them (tried), far less than TOLERANCE notices."""
    return (actual != expected).float().mean().item()


def check_against_both(gemv, moe, layer, top_k, tiles, logits=None):
    """expert_gemv on fused_moe.route's choice against the reference and against
    expert_gemms on the same SortedRouting; returns the output."""
    x, router, gate_up, down, scales = layer
    routing = moe.route(router if logits is None else logits, top_k, True, 16)
    with poisoned_allocations():
        out = gemv.expert_gemv(x, gate_up, down, routing.experts, routing.weights, scales, tiles)
    tokens, hidden = x.shape
    assert out.shape == (tokens, top_k, hidden) and out.dtype == x.dtype
    expected = gemv.expert_gemv_ref(x, gate_up, down, routing.experts, routing.weights, scales)
    assert rel_err(out, expected) < TOLERANCE[x.dtype]
    tile = moe.GemmTile(32, 32, 4, 1)
    config = moe.MoeConfig(16, tile, tile)
    grouped = moe.expert_gemms(x, gate_up, down, routing, config, scales, sum_top_k=False)
    assert grouped.shape == out.shape
    assert rel_err(out, grouped) < TOLERANCE[x.dtype]
    if x.dtype == torch.float16:  # the same rounding steps as the reference and the GEMMs
        assert mismatched(out, expected) < 0.05 and mismatched(grouped, expected) < 0.05
    assert all(not c.any() for c in _counters(gemv)), "a counter left non-zero"
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize(("tokens", "top_k"), [(1, 2), (2, 1), (3, 4)])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_and_grouped_gemms_interpreted(
    gemv_interpreted, moe_interpreted, dtype, fp8, tokens, top_k, split_k
):
    layer = make_layer(
        tokens, HIDDEN, INNER, EXPERTS, dtype=dtype, device="cpu", fp8=fp8, seed=tokens * 10 + top_k
    )
    tiles = small_tiles(gemv_interpreted, split_k)
    check_against_both(gemv_interpreted, moe_interpreted, layer, top_k, tiles)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tokens_sharing_experts_interpreted(gemv_interpreted, moe_interpreted, dtype):
    """Both tokens pick experts 5 then 2 (each expert read by two rows), a split of 3."""
    layer = make_layer(2, HIDDEN, INNER, EXPERTS, dtype=dtype, device="cpu", seed=4)
    logits = layer[1].clone()
    logits[:, 5] += 20.0
    logits[:, 2] += 10.0
    tiles = small_tiles(gemv_interpreted, 3, block_k=16)
    out = check_against_both(gemv_interpreted, moe_interpreted, layer, 2, tiles, logits)
    assert not torch.equal(out[0], out[1])  # same experts, different tokens


@pytest.mark.timeout(60)
def test_explicit_int64_routing_and_idle_experts_interpreted(gemv_interpreted):
    """Routing as route_ref returns it (int64 experts, one token's two slots on the same
    expert); the experts nobody picked are NaN, so reading one would show."""
    x, _, gate_up, down, _ = make_layer(
        3, HIDDEN, INNER, EXPERTS, dtype=torch.float32, device="cpu", seed=5
    )
    experts = torch.tensor([[3, 6], [6, 6], [0, 3]])
    weights = torch.rand(3, 2, generator=torch.Generator().manual_seed(1))
    idle = [e for e in range(EXPERTS) if e not in experts]
    gate_up[idle], down[idle] = float("nan"), float("nan")
    tiles = small_tiles(gemv_interpreted, 2)
    with poisoned_allocations():
        out = gemv_interpreted.expert_gemv(x, gate_up, down, experts, weights, None, tiles)
    expected = gemv_interpreted.expert_gemv_ref(x, gate_up, down, experts, weights)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < TOLERANCE[torch.float32]
    assert rel_err(out[1, 0] / weights[1, 0], out[1, 1] / weights[1, 1]) < 1e-6


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fp8", [False, True])
def test_default_tiles_and_strided_x_interpreted(gemv_interpreted, moe_interpreted, fp8):
    """expert_gemv_tiles' own choice (one partial K tile of 128 here), x a row-strided
    view."""
    x, logits, gate_up, down, scales = make_layer(
        2, HIDDEN, INNER, EXPERTS, fp8=fp8, dtype=torch.float16, device="cpu", seed=6
    )
    wide = torch.randn(2, 200).half()
    wide[:, 7 : 7 + HIDDEN] = x
    layer = (wide[:, 7 : 7 + HIDDEN], logits, gate_up, down, scales)
    check_against_both(gemv_interpreted, moe_interpreted, layer, 2, None)


@pytest.mark.timeout(60)
def test_split_k_is_reproducible_interpreted(gemv_interpreted):
    """Two calls give the same bits and leave every counter at 0; H=96 in 6 K tiles over 3
    and over 4 splits (2, 2, 2; 2, 2, 2, 0), I=48 in 3 over 3 and 4."""
    x, logits, gate_up, down, scales = make_layer(
        3, HIDDEN, INNER, EXPERTS, fp8=True, dtype=torch.float16, device="cpu", seed=7
    )
    routing = route_ref(logits, 2, True)
    for split_k in (3, 4):
        tiles = small_tiles(gemv_interpreted, split_k, block_k=16)
        args = (x, gate_up, down, routing.experts, routing.weights, scales, tiles)
        with poisoned_allocations():
            first = gemv_interpreted.expert_gemv(*args)
            second = gemv_interpreted.expert_gemv(*args)
        assert torch.equal(first.view(torch.int16), second.view(torch.int16))
        assert all(not c.any() for c in _counters(gemv_interpreted))
        expected = gemv_interpreted.expert_gemv_ref(*args[:-1])
        assert rel_err(first, expected) < TOLERANCE[torch.float16]
        assert mismatched(first, expected) < 0.05


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fp8", [False, True])
def test_reference_summed_is_fused_moe_ref(fp8):
    """expert_gemv_ref's rows summed over the slots in float32 are fused_moe_ref's layer
    (which rounds once, at the end, and dequantizes float8 experts first)."""
    gemv = importlib.import_module("mii.kernels.moe_gemv")
    x, logits, gate_up, down, scales = make_layer(
        4, 64, 40, 6, dtype=torch.float32, device="cpu", fp8=fp8, seed=8
    )
    routing = route_ref(logits, 3, False)
    rows = gemv.expert_gemv_ref(x, gate_up, down, routing.experts, routing.weights, scales)
    expected = fused_moe_ref(x, gate_up, down, Routing(*routing), scales)
    assert rel_err(rows.sum(dim=1), expected) < 1e-5


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("itemsize", [1, 2, 4])
def test_tile_choice(rows, itemsize):
    """Every split starts inside K, the grids hold a few programs per SM where K allows,
    K tiles span TILE_ROW_BYTES of a weight row, a thread converts at most THREAD_ELEMENTS
    weights per step."""
    gemv = importlib.import_module("mii.kernels.moe_gemv")
    for hidden, inner in [(4096, 7168), (4096, 14336), (4096, 1792), (2048, 704), (96, 48)]:
        tiles = gemv.expert_gemv_tiles(rows, hidden, inner, itemsize, sms=132)
        for t, n, k, weight_tiles in ((tiles.gate_up, inner, hidden, 2),
                                      (tiles.down, hidden, inner, 1)):  # fmt: skip
            k_tiles = -(-k // t.block_k)
            per_split = -(-k_tiles // t.split_k)
            assert 1 <= t.split_k <= k_tiles and (t.split_k - 1) * per_split < k_tiles
            assert t.block_k * itemsize <= gemv.TILE_ROW_BYTES
            programs = rows * -(-n // t.block_n) * t.split_k
            assert programs >= min(4 * 132, rows * -(-n // t.block_n) * k_tiles)
            elements = weight_tiles * t.block_n * t.block_k
            assert elements <= 32 * t.num_warps * gemv.THREAD_ELEMENTS
    bf16 = gemv.expert_gemv_tiles(2, 4096, 7168, 2, sms=132)
    assert (bf16.gate_up.split_k, bf16.down.split_k) == (1, 4)  # as the docstring says


def test_preconditions():
    gemv = importlib.import_module("mii.kernels.moe_gemv")
    x, _, gate_up, down, scales = make_layer(
        1, 64, 32, 4, dtype=torch.float32, device="cpu", fp8=True
    )
    experts, weights = torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]])
    with pytest.raises(AssertionError):
        gemv.expert_gemv(x, gate_up, down, experts, weights)  # float8 without scales
    with pytest.raises(AssertionError):
        gemv.expert_gemv(x, gate_up, down, experts, weights.double(), scales)
    with pytest.raises(AssertionError):
        gemv.expert_gemv(x, gate_up, down, experts.float(), weights, scales)
    with pytest.raises(AssertionError):
        gemv.expert_gemv(x, gate_up, down.transpose(1, 2), experts, weights, scales)
    assert gemv.expert_gemv_supported(x, gate_up, experts)
    assert not gemv.expert_gemv_supported(torch.randn(5, 64), gate_up, experts)


# ---- GPU -------------------------------------------------------------------------------

MIXTRAL_TP2 = (4096, 7168, 8)  # H, I per rank, E


@pytest.mark.gpu
@pytest.mark.timeout(180)
@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("fp8", [False, True])
def test_mixtral_shape_gpu(gemv_compiled, moe_compiled, fp8, tokens):
    hidden, inner, experts = MIXTRAL_TP2
    x, logits, gate_up, down, scales = make_layer(
        tokens, hidden, inner, experts, fp8=fp8, dtype=torch.bfloat16, device="cuda"
    )
    routing = moe_compiled.route(logits, 2, True, 16)
    args = (x, gate_up, down, routing.experts, routing.weights, scales)
    with poisoned_allocations():
        out = gemv_compiled.expert_gemv(*args)
        again = gemv_compiled.expert_gemv(*args)
    expected = gemv_compiled.expert_gemv_ref(*args)
    assert out.shape == (tokens, 2, hidden) and out.dtype == torch.bfloat16
    assert rel_err(out, expected) < TOLERANCE[torch.bfloat16]
    assert mismatched(out, expected) < 0.05
    assert torch.equal(out.view(torch.int16), again.view(torch.int16))
    config = moe_compiled.moe_config(tokens, 2, experts)
    grouped = moe_compiled.expert_gemms(x, gate_up, down, routing, config, scales, False)
    assert rel_err(out, grouped) < TOLERANCE[torch.bfloat16]
    torch.cuda.synchronize()
    assert all(not c.any() for c in _counters(gemv_compiled))


@pytest.mark.gpu
@pytest.mark.timeout(180)
@pytest.mark.parametrize("fp8", [False, True])
def test_cuda_graph_replays_gpu(gemv_compiled, moe_compiled, fp8):
    """Routing and both GEMVs captured (workspaces allocated by the eager call), replayed
    twice: the eager bits each time, counters back at 0; then new inputs in place (other
    experts picked) and the replay follows them."""
    hidden, inner, experts = MIXTRAL_TP2
    x, logits, gate_up, down, scales = make_layer(
        2, hidden, inner, experts, fp8=fp8, dtype=torch.bfloat16, device="cuda"
    )

    def step():
        r = moe_compiled.route(logits, 2, True, 16)
        return gemv_compiled.expert_gemv(x, gate_up, down, r.experts, r.weights, scales)

    eager = step()
    tiles = gemv_compiled.reserve_workspaces(x, gate_up, 2)
    assert tiles.down.split_k > 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(2):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        assert all(not c.any() for c in _counters(gemv_compiled))
    x2, logits2, *_ = make_layer(
        2, hidden, inner, experts, dtype=torch.bfloat16, device="cuda", seed=9
    )
    x.copy_(x2)
    logits.copy_(logits2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, step())


@pytest.mark.parametrize("sum_top_k", [True, False])
def test_fused_moe_takes_the_gemv_for_one_token(
    gemv_interpreted, moe_interpreted, monkeypatch, sum_top_k
):
    """A one-token step goes through expert_gemv (its bits, summed or not); larger steps,
    and every step with `MII_MOE_GEMV=0`, stay on the grouped GEMMs."""
    x, logits, gate_up, down, _ = make_layer(2, 96, 48, 8, dtype=torch.float32, device="cpu")
    one = x[:1]
    routing = moe_interpreted.route(
        logits[:1], 2, True, moe_interpreted.moe_config(1, 2, 8).block_m
    )
    direct = gemv_interpreted.expert_gemv(one, gate_up, down, routing.experts, routing.weights)
    want = direct.sum(dim=1) if sum_top_k else direct
    monkeypatch.delenv("MII_MOE_GEMV", raising=False)
    got = moe_interpreted.fused_moe(one, logits[:1], gate_up, down, 2, True, sum_top_k=sum_top_k)
    assert torch.equal(got, want)
    assert not moe_interpreted.expert_gemv_on(x)
    monkeypatch.setenv("MII_MOE_GEMV", "0")
    assert not moe_interpreted.expert_gemv_on(one)
