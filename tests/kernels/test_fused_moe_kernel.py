"""The fused MoE kernels against `fused_moe_ref`: routing and its sort by expert, then the
whole layer, in the interpreter (fp32/fp16) and on the GPU (bf16); the reference itself
against a dense definition."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import TOLERANCE, poisoned_allocations, rel_err

from mii.kernels import dispatch
from mii.kernels.fused_moe_ref import Routing, fused_moe_ref, quantize_experts, route_ref


@pytest.fixture(scope="module")
def moe_interpreted(interpreted):
    return importlib.import_module("mii.kernels.fused_moe")


@pytest.fixture(scope="module")
def moe_compiled(compiled):
    return importlib.import_module("mii.kernels.fused_moe")


def small_config(module, block_m=16, block_n=32, block_k=32):
    """Small tiles, so that tiny shapes still cross tile edges: I = 48 is 1.5 column tiles,
    a hidden size of 96 ends in a partial K tile."""
    tile = module.GemmTile(block_n, block_k, 4, 1)
    return module.MoeConfig(block_m, tile, tile)


def make_layer(tokens, hidden, inner, experts, *, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)

    x = rand(tokens, hidden)
    logits = rand(tokens, experts, scale=2.0)
    gate_up = rand(experts, 2 * inner, hidden, scale=hidden**-0.5)
    down = rand(experts, hidden, inner, scale=inner**-0.5)
    return x, logits, gate_up, down


def check_sorted(routing, tokens, top_k, experts) -> list[int]:
    """The sort's invariants; returns how many entries each expert got."""
    blocks = routing.block_rows.cpu().tolist()
    owners = routing.block_expert.cpu().tolist()
    ids = routing.sorted_ids.cpu()
    flat = routing.experts.cpu().flatten()
    seen, counts = [], [0] * experts
    for b, (rows, expert) in enumerate(zip(blocks, owners, strict=True)):
        assert 0 <= rows <= routing.block_m
        entries = ids[b * routing.block_m : b * routing.block_m + rows]
        assert (flat[entries.long()] == expert).all(), "a row sorted under another expert"
        seen += entries.tolist()
        counts[expert] += rows
    assert sorted(seen) == list(range(tokens * top_k)), "every entry exactly once"
    used = [b for b, rows in enumerate(blocks) if rows]
    assert used == list(range(len(used))), "used blocks first, unused ones after"
    return counts


def check_routing(module, logits, top_k, renormalize, block_m=16) -> list[int]:
    """The kernel picks top-k experts: the same logits as torch's top-k, in falling order
    (where logits tie, as bf16 logits of many tokens do, either expert is right), and the
    same weights."""
    routing = module.route(logits, top_k, renormalize, block_m)
    expected = route_ref(logits, top_k, renormalize)
    picked = torch.gather(logits, 1, routing.experts.long()).float().cpu()
    best = torch.gather(logits, 1, expected.experts).float().cpu()
    assert torch.equal(picked, best)
    assert rel_err(routing.weights.cpu(), expected.weights.cpu()) < 1e-5
    return check_sorted(routing, logits.shape[0], top_k, logits.shape[1])


def fp8_experts(layer):
    """The layer with its experts in float8, one scale per expert and output row."""
    x, logits, gate_up, down = layer
    (q_gate_up, gate_up_scale), (q_down, down_scale) = map(quantize_experts, (gate_up, down))
    return (x, logits, q_gate_up, q_down), (gate_up_scale, down_scale)


def check_layer(module, layer, top_k, renormalize, config=None, scales=None) -> torch.Tensor:
    """The layer against the reference given the kernel's own choice of experts (ties
    between logits may be broken either way; `check_routing` checks the choice)."""
    x, logits, gate_up, down = layer
    with poisoned_allocations():
        out = module.fused_moe(x, logits, gate_up, down, top_k, renormalize, config, scales)
    chosen = module.route(logits, top_k, renormalize, 16)
    routing = Routing(chosen.weights, chosen.experts.long())
    expected = fused_moe_ref(x, gate_up, down, routing, scales)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, expected) < TOLERANCE[x.dtype]
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tokens", [1, 5, 300])  # 300: two tiles of the routing loop
@pytest.mark.parametrize(("experts", "top_k", "renormalize"), [(8, 2, True), (60, 4, False)])
def test_routing_interpreted(moe_interpreted, tokens, experts, top_k, renormalize):
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens))
    counts = check_routing(moe_interpreted, logits, top_k, renormalize)
    assert sum(counts) == tokens * top_k


@pytest.mark.timeout(60)
def test_routing_of_half_precision_logits_interpreted(moe_interpreted):
    logits = torch.randn(33, 8, generator=torch.Generator().manual_seed(1)).half()
    check_routing(moe_interpreted, logits, 2, True, block_m=32)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("tokens", "hidden", "experts", "top_k", "renormalize", "block_m"),
    [
        (1, 64, 8, 2, True, 16),  # decode: one token, six experts idle
        (7, 96, 8, 2, True, 16),  # a partial K tile
        (70, 64, 8, 2, True, 32),  # several blocks per expert
        (40, 64, 6, 3, False, 16),  # Qwen2-MoE-like: no renormalisation
        (9, 64, 4, 1, False, 16),  # top-1: no sum over slots
    ],
)  # fmt: skip
def test_layer_matches_reference_interpreted(
    moe_interpreted, dtype, tokens, hidden, experts, top_k, renormalize, block_m
):
    layer = make_layer(tokens, hidden, 48, experts, dtype=dtype, device="cpu", seed=tokens)
    config = small_config(moe_interpreted, block_m)
    check_layer(moe_interpreted, layer, top_k, renormalize, config)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("tokens", "hidden", "experts", "top_k", "renormalize"),
    [(1, 64, 8, 2, True), (7, 96, 8, 2, True), (40, 64, 6, 3, False)],
)
def test_fp8_experts_match_reference_interpreted(
    moe_interpreted, dtype, tokens, hidden, experts, top_k, renormalize
):
    """Float8 experts with row scales: each weight tile converted in the kernel and the
    scales applied to the sums; the reference dequantizes the experts it uses."""
    layer = make_layer(tokens, hidden, 48, experts, dtype=dtype, device="cpu", seed=tokens)
    quantized, scales = fp8_experts(layer)
    assert quantized[2].dtype == torch.float8_e4m3fn
    out = check_layer(
        moe_interpreted, quantized, top_k, renormalize, small_config(moe_interpreted), scales
    )
    # and the float8 rounding of the weights is all that moved the result
    full = check_layer(moe_interpreted, layer, top_k, renormalize, small_config(moe_interpreted))
    assert 0 < rel_err(out, full.float()) < 0.1


@pytest.mark.timeout(60)
def test_experts_that_get_no_token_interpreted(moe_interpreted):
    x, logits, gate_up, down = make_layer(3, 64, 48, 8, dtype=torch.float32, device="cpu")
    counts = check_routing(moe_interpreted, logits, 2, True)
    assert 0 in counts  # 6 entries over 8 experts
    # Poison the idle experts: a kernel that read them would turn the output NaN.
    idle = [e for e, n in enumerate(counts) if n == 0]
    gate_up[idle], down[idle] = float("nan"), float("nan")
    config = small_config(moe_interpreted)
    out = check_layer(moe_interpreted, (x, logits, gate_up, down), 2, True, config)
    assert torch.isfinite(out).all()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_token_picks_the_same_experts_interpreted(moe_interpreted, dtype):
    x, logits, gate_up, down = make_layer(37, 64, 48, 8, dtype=dtype, device="cpu", seed=3)
    logits[:, 5] += 20.0  # expert 5 first, expert 2 second, for every token
    logits[:, 2] += 10.0
    counts = check_routing(moe_interpreted, logits, 2, True)
    assert counts == [0, 0, 37, 0, 0, 37, 0, 0]  # 3 blocks each, the last one partial
    config = small_config(moe_interpreted)
    check_layer(moe_interpreted, (x, logits, gate_up, down), 2, True, config)


class LaunchRecorder:
    """Stands in for a kernel: keeps each launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tokens", [256, 1000])
@pytest.mark.parametrize(("experts", "top_k"), [(60, 4), (128, 8)])
def test_routing_tiles_of_many_experts_stay_small_interpreted(
    moe_interpreted, monkeypatch, tokens, experts, top_k
):
    """The routing program's (token, expert) tiles hold at most 16 values a thread. With
    60 experts they were (256, 64) from 256 tokens on: 128 a thread, some 2,000 registers
    spilled, and ptxas took about 70 s per specialisation, so the GPU tests of 256 and 1000
    tokens, which compile two each, ran past their 120 s (measured on an H200, triton 3.6)."""
    recorder = LaunchRecorder(moe_interpreted._route_kernel)
    monkeypatch.setattr(moe_interpreted, "_route_kernel", recorder)
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens))
    block_m = moe_interpreted.moe_config(tokens, top_k, experts).block_m
    check_routing(moe_interpreted, logits, top_k, False, block_m)
    launch = recorder.launches[0]
    threads = 32 * launch["num_warps"]
    assert launch["BLOCK_T"] * launch["BLOCK_E"] <= 16 * threads
    assert launch["BLOCK_B"] * launch["BLOCK_E"] <= 16 * threads


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [256, 1000])
def test_many_experts_with_the_default_tiles_interpreted(moe_interpreted, dtype, tokens):
    """The Qwen2-MoE-like GPU case (60 experts, top-4) at its step sizes' default tiles
    (block_m 32 and 64), a smaller hidden size so that the interpreter keeps up."""
    layer = make_layer(tokens, 256, 192, 60, dtype=dtype, device="cpu")
    check_layer(moe_interpreted, layer, 4, False)


@pytest.mark.timeout(120)
def test_every_expert_ends_in_a_partial_block_interpreted(moe_interpreted):
    """The host's bound on the blocks, reached: each of 60 experts gets 17 = 16 + 1
    entries, so every block that `sorted_ids`, `h` and the GEMM grids were sized for is used
    (a wrong bound would write past them)."""
    tokens, experts, top_k = 255, 60, 4
    x, logits, gate_up, down = make_layer(
        tokens, 64, 48, experts, dtype=torch.float32, device="cpu"
    )
    entries = torch.arange(tokens * top_k).view(tokens, top_k)  # expert of entry i: i % 60
    logits.scatter_(1, entries % experts, torch.tensor([40.0, 30.0, 20.0, 10.0]).expand(tokens, -1))
    with poisoned_allocations():
        counts = check_routing(moe_interpreted, logits, top_k, False)
    assert counts == [17] * experts
    routing = moe_interpreted.route(logits, top_k, False, 16)
    assert (routing.block_rows.cpu() > 0).all()
    assert routing.block_rows.numel() == moe_interpreted.max_blocks(tokens, top_k, experts, 16)
    check_layer(
        moe_interpreted, (x, logits, gate_up, down), top_k, False, small_config(moe_interpreted)
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize("tokens", [0, 1, 16, 256, 4096])
def test_default_configs_cover_the_step_sizes(moe_interpreted, tokens):
    config = moe_interpreted.moe_config(tokens, 2, 8)
    assert config.block_m in (16, 32, 64, 128)
    blocks = moe_interpreted.max_blocks(tokens, 2, 8, config.block_m)
    assert blocks * config.block_m >= tokens * 2  # room for every entry, padded
    if tokens == 1:
        assert blocks <= 2  # a decode token's two experts, one block each


@pytest.mark.timeout(30)
def test_default_tiles_fit_shared_memory_in_bf16_and_shrink_for_fp32(moe_interpreted):
    fit = moe_interpreted.fit_shared_memory
    for tokens in (1, 16, 64, 256, 4096):
        config = moe_interpreted.moe_config(tokens, 2, 8)
        for tile, weight_tiles in ((config.gate_up, 2), (config.down, 1)):
            assert fit(tile, config.block_m, weight_tiles, 2) == tile  # bf16: as chosen
            small = fit(tile, config.block_m, weight_tiles, 4)
            stage = (config.block_m + weight_tiles * small.block_n) * small.block_k * 4
            assert stage * small.num_stages <= moe_interpreted.SHARED_MEMORY


def dense_moe(x, gate_up, down, routing):
    """Every expert over every token, weighted by a dense (T, E) routing matrix."""
    dense = torch.zeros(x.shape[0], gate_up.shape[0]).scatter(1, routing.experts, routing.weights)
    outs = [F.linear(F.silu(g) * u, w) for g, u, w in _expert_parts(x, gate_up, down)]
    return torch.einsum("te,eth->th", dense, torch.stack(outs))


def _expert_parts(x, gate_up, down):
    for e in range(gate_up.shape[0]):
        gate, up = F.linear(x, gate_up[e]).chunk(2, dim=-1)
        yield gate, up, down[e]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("top_k", "renormalize"), [(2, True), (3, False)])
def test_reference_against_a_dense_definition(top_k, renormalize):
    x, logits, gate_up, down = make_layer(20, 32, 24, 6, dtype=torch.float32, device="cpu")
    routing = route_ref(logits, top_k, renormalize)
    expected = dense_moe(x, gate_up, down, routing)
    assert rel_err(fused_moe_ref(x, gate_up, down, routing), expected) < 1e-5
    sums = routing.weights.sum(-1)
    assert torch.allclose(sums, torch.ones(20)) == renormalize


@pytest.mark.timeout(30)
def test_mixtral_softmax_over_the_top_k_logits_is_renormalised_routing():
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    routing = route_ref(logits, 2, renormalize=True)
    top, experts = logits.topk(2, dim=-1)
    assert torch.equal(routing.experts, experts)
    assert torch.allclose(routing.weights, torch.softmax(top, dim=-1), atol=1e-6)


@pytest.mark.timeout(30)
def test_dispatch_on_cpu_is_the_reference():
    x, logits, gate_up, down = make_layer(11, 32, 24, 4, dtype=torch.float32, device="cpu")
    out = dispatch.fused_moe(x, logits, gate_up, down, 2, False)
    expected = fused_moe_ref(x, gate_up, down, route_ref(logits, 2, False))
    assert torch.equal(out, expected)


# ---- GPU, bf16 -----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("tokens", [1, 16, 256, 1000])
@pytest.mark.parametrize(
    ("experts", "top_k", "renormalize", "inner"), [(8, 2, True, 1792), (60, 4, False, 704)]
)
def test_layer_matches_reference_gpu(moe_compiled, tokens, experts, top_k, renormalize, inner):
    """Mixtral-like (TP=8 slice of its I) and Qwen2-MoE-like (I=1408 at TP=2) experts with
    the default tiles of each step size."""
    layer = make_layer(tokens, 1024, inner, experts, dtype=torch.bfloat16, device="cuda")
    check_routing(moe_compiled, layer[1], top_k, renormalize)
    check_layer(moe_compiled, layer, top_k, renormalize)


@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("tokens", [1, 16, 256])
def test_fp8_experts_match_reference_gpu(moe_compiled, tokens):
    layer = make_layer(tokens, 1024, 1792, 8, dtype=torch.bfloat16, device="cuda")
    quantized, scales = fp8_experts(layer)
    check_layer(moe_compiled, quantized, 2, True, scales=scales)


@pytest.mark.gpu
@pytest.mark.timeout(60)
def test_every_token_picks_the_same_experts_gpu(moe_compiled):
    x, logits, gate_up, down = make_layer(300, 1024, 1792, 8, dtype=torch.bfloat16, device="cuda")
    logits[:, 1] += 20.0
    logits[:, 6] += 10.0
    assert check_routing(moe_compiled, logits, 2, True)[1] == 300
    check_layer(moe_compiled, (x, logits, gate_up, down), 2, True)


@pytest.mark.gpu
@pytest.mark.timeout(60)
def test_graph_capture_replays_new_routing_gpu(moe_compiled):
    """No host sync inside: the layer captures into a CUDA graph and a replay over new
    inputs (other experts picked) matches the reference."""
    x, logits, gate_up, down = make_layer(4, 1024, 1792, 8, dtype=torch.bfloat16, device="cuda")
    moe_compiled.fused_moe(x, logits, gate_up, down, 2, True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_compiled.fused_moe(x, logits, gate_up, down, 2, True)
    x2, logits2, _, _ = make_layer(4, 1024, 1792, 8, dtype=torch.bfloat16, device="cuda", seed=9)
    x.copy_(x2)
    logits.copy_(logits2)
    graph.replay()
    expected = fused_moe_ref(x, gate_up, down, route_ref(logits, 2, True))
    assert rel_err(out, expected) < TOLERANCE[torch.bfloat16]
