"""The one-shot all-reduce kernel with its peers simulated in one process: every rank's
buffers are tensors here, the other ranks' calls are played by writing their data and
signals where theirs would land. The two-process run on two GPUs is in
tests/engine/test_tensor_parallel.py."""

from __future__ import annotations

import importlib

import pytest
import torch

WORLD_SIZES = (2, 4)


@pytest.fixture(scope="module")
def ar_interpreted(interpreted):
    return importlib.import_module("mii.kernels.all_reduce")


@pytest.fixture(scope="module")
def ar_compiled(compiled):
    return importlib.import_module("mii.kernels.all_reduce")


class Group:
    """Every rank's buffers of a `world`-rank group, in this process."""

    def __init__(self, module, world, capacity, dtype, device, programs=None, push=False):
        self.m, self.world, self.push = module, world, push
        programs = programs or -(-capacity // module.BLOCK)
        self.data = [
            module.push_data(world, capacity, dtype, device)
            if push
            else torch.zeros(2, capacity, dtype=dtype, device=device)
            for _ in range(world)
        ]
        self.flags = [
            torch.zeros(programs, module.MAX_RANKS, dtype=torch.int64, device=device)
            for _ in range(world)
        ]

    def view(self, rank):
        return self.m.PeerBuffers(
            rank,
            self.data[rank],
            self.flags[rank],
            [d.data_ptr() for d in self.data],
            [f.data_ptr() for f in self.flags],
        )

    def peer_calls(self, rank, epoch, inputs, programs=None):
        """Play every rank but `rank` making call number `epoch` with `inputs` (over
        `programs` programs: the flat kernel's by default)."""
        programs = programs or -(-inputs[0].numel() // self.m.BLOCK)
        for peer in range(self.world):
            if peer != rank and self.push:  # its data pushed into this rank's third
                self.data[rank][epoch % 3, peer, : inputs[peer].numel()] = sent(inputs[peer])
            elif peer != rank:
                self.data[peer][epoch % 2, : inputs[peer].numel()] = inputs[peer].flatten()
                self.flags[rank][:programs, peer] = epoch


def sent(x):
    """x as a push sends it: -0.0 (the empty mark) as +0.0."""
    x = x.flatten()
    return torch.where(x == 0, torch.zeros_like(x), x)


def empty(t):
    """Where t holds the empty mark (-0.0)."""
    return (t == 0) & torch.signbit(t)


def rank_order_sum(inputs):
    acc = torch.zeros_like(inputs[0], dtype=torch.float32)
    for x in inputs:
        acc += x.float()
    return acc.to(inputs[0].dtype)


def check_calls(module, world, n, dtype, device, rank=1, push=False):
    capacity = 3 * module.BLOCK
    group = Group(module, world, capacity, dtype, device, push=push)
    mine = group.view(rank)
    programs = -(-n // module.BLOCK)
    assert not push or empty(group.data[rank]).all(), "push buffers start empty"
    for epoch in (1, 2, 3, 4):  # each half (third) used, then the first again
        gen = torch.Generator().manual_seed(epoch)
        inputs = [
            torch.randn(n, generator=gen).to(dtype=dtype, device=device) for _ in range(world)
        ]
        inputs[rank][::7] = -0.0  # sent as +0.0 by a push
        group.peer_calls(rank, epoch, inputs)
        out = module.one_shot_all_reduce(inputs[rank], mine)
        assert torch.equal(out, rank_order_sum(inputs)), f"call {epoch}"
        assert (mine.epochs[:programs] == epoch).all() and (mine.epochs[programs:] == 0).all()
        if not push:
            assert torch.equal(group.data[rank][epoch % 2, :n], inputs[rank]), "own half"
            for peer in range(world):  # this rank's signal, in every rank's flags
                assert (group.flags[peer][:programs, rank] == epoch).all()
            continue
        for peer in range(world):  # this rank's data, in its slot of every peer's third
            if peer != rank:
                bits = torch.int16 if dtype.itemsize == 2 else torch.int32
                got = group.data[peer][epoch % 3, rank, :n].view(bits)
                assert got.equal(sent(inputs[rank]).view(bits)), f"pushed to rank {peer}"
        # the third of the call before is empty again in every program's whole chunk
        chunk = min(capacity, programs * module.BLOCK)
        assert empty(group.data[rank][(epoch + 2) % 3, :, :chunk]).all()


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("n", [8, 2048, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_one_shot_sums_every_rank_in_rank_order(ar_interpreted, world, n, dtype, push):
    check_calls(ar_interpreted, world, n, dtype, "cpu", push=push)


def test_every_rank_gets_the_same_bits(ar_interpreted):
    """The sum runs in rank order wherever it is computed: the ranks cannot drift apart."""
    m, world, n = ar_interpreted, 4, 3000
    inputs = [torch.randn(n).half() * 10 ** (r - 2) for r in range(world)]
    results = []
    for rank in range(world):
        group = Group(m, world, n, torch.float16, "cpu")
        group.peer_calls(rank, 1, inputs)
        results.append(m.one_shot_all_reduce(inputs[rank], group.view(rank)))
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize("top_k", [2, 3])
@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_expert_rows_summed_before_the_ranks(ar_interpreted, top_k, push):
    """(T, top_k, H) expert outputs: each rank's rows of a token summed as torch.sum(dim=1)
    rounds them, then the ranks' sums, into (T, H)."""
    check_expert_rows(ar_interpreted, top_k, torch.float16, "cpu", push=push)


def check_expert_rows(m, top_k, dtype, device, world=2, rank=0, tokens=3, hidden=1500,
                      push=False):  # fmt: skip
    experts = [torch.randn(tokens, top_k, hidden).to(dtype=dtype, device=device)
               for _ in range(world)]  # fmt: skip
    summed = [e.sum(dim=1) for e in experts]
    group = Group(m, world, tokens * hidden, dtype, device, push=push)
    group.peer_calls(rank, 1, [s.flatten() for s in summed])
    out = m.one_shot_all_reduce(experts[rank], group.view(rank), top_k=top_k)
    assert out.shape == (tokens, hidden)
    assert torch.equal(out, rank_order_sum(summed))


def check_norm_calls(m, norm, world, rows, hidden, dtype, device, rank=1, push=False):
    """The all-reduce with the residual add and RMSNorm folded in gives the bits of the
    all-reduce followed by kernels/rms_norm.py, over four calls (each half or third, then the
    first again)."""
    group = Group(m, world, 2 * rows * hidden, dtype, device, programs=rows + 1, push=push)
    mine = group.view(rank)
    for epoch in (1, 2, 3, 4):
        gen = torch.Generator().manual_seed(epoch)

        def rand(*shape, gen=gen):
            return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

        inputs, residual, weight = (
            [rand(rows, hidden) for _ in range(world)],
            rand(rows, hidden),
            rand(hidden),
        )
        group.peer_calls(rank, epoch, inputs, programs=rows)
        out, new_residual = m.one_shot_all_reduce_norm(inputs[rank], residual, weight, 1e-5, mine)
        want_out, want_residual = norm.rms_norm(rank_order_sum(inputs), weight, 1e-5, residual)
        assert torch.equal(new_residual, want_residual), f"call {epoch}"
        assert torch.equal(out, want_out), f"call {epoch}"
        if push:  # this rank's rows in every peer's third; the third before empty again
            for peer in range(world):
                if peer != rank:
                    got = group.data[peer][epoch % 3, rank, : rows * hidden]
                    assert got.equal(sent(inputs[rank]))
            assert empty(group.data[rank][(epoch + 2) % 3, :, : rows * hidden]).all()
            continue
        for peer in range(world):  # this rank's signal, one per row, in every rank's flags
            assert (group.flags[peer][:rows, rank] == epoch).all()
            assert (group.flags[peer][rows:, rank] == 0).all()


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("rows, hidden", [(1, 64), (3, 200)])
@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_all_reduce_with_residual_and_norm(ar_interpreted, world, rows, hidden, push):
    norm = importlib.import_module("mii.kernels.rms_norm")
    check_norm_calls(ar_interpreted, norm, world, rows, hidden, torch.float32, "cpu", push=push)


@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_reset_buffers_start_over(ar_interpreted, push):
    """`reset` makes used buffers new again: empty (push) or zero, no call counted, any
    width of rows."""
    m = ar_interpreted
    group = Group(m, 2, 64, torch.float32, "cpu", programs=2, push=push)
    mine = group.view(0)
    group.peer_calls(0, 1, [torch.ones(2, 16)] * 2, programs=2)
    m.one_shot_all_reduce_norm(torch.ones(2, 16), torch.ones(2, 16), torch.ones(16), 1e-5, mine)
    assert mine.row_width == 16 and (mine.epochs[:2] == 1).all()
    with pytest.raises(AssertionError, match="one width"):
        m.one_shot_all_reduce_norm(torch.ones(1, 32), torch.ones(1, 32), torch.ones(32), 1e-5, mine)
    mine.reset()
    assert mine.row_width == 0 and (mine.epochs == 0).all() and (mine.flags == 0).all()
    assert empty(mine.data).all() if push else (mine.data == 0).all()
    group.peer_calls(0, 1, [torch.ones(1, 32)] * 2, programs=1)
    out, _ = m.one_shot_all_reduce_norm(
        torch.ones(1, 32), torch.zeros(1, 32), torch.ones(32), 1e-5, mine
    )
    assert out.shape == (1, 32) and mine.row_width == 32


def test_all_reduce_with_norm_refuses_more_rows_than_flags(ar_interpreted):
    m = ar_interpreted
    group = Group(m, 2, 64, torch.float32, "cpu", programs=2)
    x = torch.ones(3, 8)
    with pytest.raises(AssertionError, match="larger than the peer buffers"):
        m.one_shot_all_reduce_norm(x, x, torch.ones(8), 1e-5, group.view(0))


@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_an_abort_releases_a_wait_for_a_dead_peer(ar_interpreted, push):
    """A peer that never signals (it died) holds the call only until the host raises the
    abort word; every later call returns at once too."""
    m = ar_interpreted
    group = Group(m, 2, m.BLOCK, torch.float32, "cpu", push=push)
    mine = group.view(0)
    mine.abort()
    for _ in range(2):
        out = m.one_shot_all_reduce(torch.ones(m.BLOCK), mine)
        assert out.shape == (m.BLOCK,)
    if push:
        assert (group.data[1][2, 0] == 1).all(), "its own data still went out"
    else:
        assert (group.flags[1][:, 0] == 2).all(), "its own signals still went out"


def test_a_message_past_the_buffers_is_refused(ar_interpreted):
    group = Group(ar_interpreted, 2, ar_interpreted.BLOCK, torch.float32, "cpu")
    with pytest.raises(AssertionError, match="larger than the peer buffers"):
        ar_interpreted.one_shot_all_reduce(torch.ones(ar_interpreted.BLOCK + 1), group.view(0))


@pytest.mark.gpu
@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("n", [4096, 5000])
@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_gpu_one_shot_sums_every_rank_in_rank_order(ar_compiled, world, n, push):
    check_calls(ar_compiled, world, n, torch.bfloat16, "cuda", push=push)


@pytest.mark.gpu
@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_gpu_an_abort_releases_a_wait_for_a_dead_peer(ar_compiled, push):
    m = ar_compiled
    group = Group(m, 2, m.BLOCK, torch.bfloat16, "cuda", push=push)
    mine = group.view(0)
    x = torch.ones(m.BLOCK, dtype=torch.bfloat16, device="cuda")
    m.one_shot_all_reduce(x, mine)  # the peer never signals: this call waits on the GPU
    mine.abort()  # from the host, while the stream is stuck in the kernel
    torch.cuda.synchronize()
    if push:
        assert (group.data[1][1, 0] == 1).all()
    else:
        assert (group.flags[1][:, 0] == 1).all()


@pytest.mark.gpu
@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_gpu_expert_rows_summed_before_the_ranks(ar_compiled, push):
    check_expert_rows(ar_compiled, 2, torch.bfloat16, "cuda", tokens=5, hidden=4096, push=push)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_gpu_all_reduce_with_residual_and_norm(ar_compiled, rows, push):
    norm = importlib.import_module("mii.kernels.rms_norm")
    check_norm_calls(ar_compiled, norm, 2, rows, 4096, torch.bfloat16, "cuda", push=push)


def check_gemv_push(m, gemv, norm, world, rows, dtype, device, split_k, hidden=64, k=128):
    """Every rank's GEMV sends its rows to the peers as it stores them (`push=`); the norm
    after it, told they are `pushed`, reads the peers' rows and gives the bits of the
    all-reduce then the norm. A call between them that is not pushed (a prefill step's
    rows, the norm sending its x itself) keeps the ranks' thirds in step."""
    group = Group(m, world, 2 * rows * hidden, dtype, device, programs=rows + 1, push=True)
    views = [group.view(r) for r in range(world)]
    tile = gemv.GemvTile(block_n=16, block_k=32, split_k=split_k, num_warps=4, num_stages=2)
    gen = torch.Generator().manual_seed(split_k)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    weights = [rand(hidden, k) / 8 for _ in range(world)]  # each rank's shard
    for epoch in (1, 2, 3, 4, 5):
        xs = [rand(rows, k) for _ in range(world)]
        residual, weight = rand(rows, hidden), rand(hidden)
        plain = [gemv.gemv(xs[r], weights[r], tile=tile) for r in range(world)]
        if epoch == 3:  # not pushed: each rank's norm sends its own rows
            outs = []
            for r in range(world):
                group.peer_calls(r, epoch, plain, programs=rows)
                outs.append(m.one_shot_all_reduce_norm(plain[r], residual, weight, 1e-5, views[r]))
        else:
            ys = [gemv.gemv(xs[r], weights[r], tile=tile, push=views[r]) for r in range(world)]
            assert all(isinstance(y, m.Pushed) and torch.equal(y.y, p)
                       for y, p in zip(ys, plain, strict=True))  # fmt: skip
            outs = [
                m.one_shot_all_reduce_norm(ys[r].y, residual, weight, 1e-5, views[r], pushed=True)
                for r in range(world)
            ]  # fmt: skip
        want = norm.rms_norm(rank_order_sum(plain), weight, 1e-5, residual)
        for r, (out, new_residual) in enumerate(outs):
            assert torch.equal(new_residual, want[1]) and torch.equal(out, want[0]), (epoch, r)
        for r in range(world):
            assert empty(group.data[r][(epoch + 2) % 3, :, : rows * hidden]).all()
            assert (views[r].epochs[:rows] == epoch).all()


@pytest.mark.parametrize("world, rows, split_k", [(2, 1, 1), (2, 3, 2), (4, 1, 2), (4, 3, 1)])
def test_gemv_pushes_its_rows_for_the_norm(ar_interpreted, world, rows, split_k):
    gemv = importlib.import_module("mii.kernels.gemv")
    norm = importlib.import_module("mii.kernels.rms_norm")
    check_gemv_push(ar_interpreted, gemv, norm, world, rows, torch.float32, "cpu", split_k)


def test_gemv_push_gives_plain_rows_where_the_buffers_cannot_take_them(ar_interpreted):
    """Rows past the buffers' size, of another dtype or another width than the rows they
    took come plain (the norm after all-reduces them without the push); pull buffers and a
    deferred push are refused."""
    m, gemv = ar_interpreted, importlib.import_module("mii.kernels.gemv")
    pulled = Group(m, 2, 64, torch.float32, "cpu", programs=2).view(0)
    group = Group(m, 2, 64, torch.float32, "cpu", programs=2, push=True)
    pushed = group.view(0)
    x, w = torch.ones(1, 32), torch.ones(16, 32)
    for rows, width, dtype in ((3, 32, torch.float32), (1, 96, torch.float32),
                               (1, 16, torch.float16)):  # fmt: skip
        y = gemv.gemv(torch.ones(rows, 32, dtype=dtype), torch.ones(width, 32, dtype=dtype),
                      push=pushed)  # fmt: skip
        assert isinstance(y, torch.Tensor) and y.shape == (rows, width)
    assert empty(group.data[1]).all() and pushed.row_width == 0, "nothing sent"
    assert isinstance(gemv.gemv(x, w, push=pushed), m.Pushed) and pushed.row_width == 16
    assert isinstance(gemv.gemv(torch.ones(1, 32), torch.ones(32, 32), push=pushed), torch.Tensor)
    with pytest.raises(AssertionError, match="to push buffers"):
        gemv.gemv(x, w, push=pulled)
    with pytest.raises(AssertionError, match="to push buffers"):
        tile = gemv.GemvTile(block_n=16, block_k=16, split_k=2, num_warps=4, num_stages=2)
        gemv.gemv(x, w, tile=tile, defer=True, push=pushed)
    with pytest.raises(AssertionError, match="pushed rows"):
        m.one_shot_all_reduce_norm(x, x, torch.ones(32), 1e-5, pulled, pushed=True)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("split_k", [1, 4])
def test_gpu_gemv_pushes_its_rows_for_the_norm(ar_compiled, rows, split_k):
    gemv = importlib.import_module("mii.kernels.gemv")
    norm = importlib.import_module("mii.kernels.rms_norm")
    check_gemv_push(ar_compiled, gemv, norm, 2, rows, torch.bfloat16, "cuda", split_k,
                    hidden=4096, k=2048)  # fmt: skip
