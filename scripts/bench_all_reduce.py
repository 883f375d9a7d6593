"""All-reduce on two GPUs: NCCL against the one-shot peer all-reduce (mii/engine/tp/
peer_all_reduce.py), pulling and pushing, over the message sizes of decode and prefill
steps, each replayed in a CUDA graph as the engine's decode steps run them. Checks that
each gives NCCL's sums.
Prints microseconds per all-reduce; writes bench_all_reduce.json under $OUT when set.

    python scripts/bench_all_reduce.py [KB ...]   # needs 2 GPUs
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_common import graph_timed, write_json

SIZES_KB = (8, 32, 128, 256, 512)
"""The sizes timed (the peer path takes up to 512 KB: `peer_all_reduce.LARGEST_BYTES`);
`python scripts/bench_all_reduce.py 8 512` times those instead."""
REPLAYS, PER_GRAPH = 20, 50


def _timed(fn, x: torch.Tensor) -> float:
    """Microseconds per fn(x), PER_GRAPH calls in one CUDA graph, the ranks in step."""
    return graph_timed(lambda i: fn(x), PER_GRAPH, REPLAYS, before_timing=dist.barrier)


def _rank(rank: int, port: int, queue, sizes_kb: tuple[int, ...]) -> None:
    os.environ["MII_PEER_ALL_REDUCE_MAX_BYTES"] = str(max(sizes_kb) * 1024)
    from mii.engine.tp import peer_all_reduce
    from mii.engine.tp.peer_all_reduce import PeerAllReduce

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    device = torch.device("cuda", rank)
    peers = {
        how: PeerAllReduce.create(dist.group.WORLD, device, torch.bfloat16, push=how == "push")
        for how in ("pull", "push")
    }
    peer = peers["push"]
    rows = []
    for kb in sizes_kb:
        x = torch.randn(kb * 512, device=device, dtype=torch.bfloat16)
        expected = x.clone()
        dist.all_reduce(expected)
        row = {"kb": kb, "nccl_us": _timed(lambda t: dist.all_reduce(t.clone()), x)}
        for how, path in peers.items():
            if path is not None:
                row[f"same_sum_{how}"] = bool(torch.equal(path(x), expected))
                row[f"{how}_us"] = _timed(path, x)
        rows.append(row)
        if rank == 0:  # as it goes: a size that hangs shows which it is
            print(f"  {kb} KB: {row}", flush=True)
    if rank == 0:
        queue.put({"device": torch.cuda.get_device_name(0), "peer": peer is not None,
                   "why_not": peer_all_reduce.last_failure, "rows": rows})  # fmt: skip
    dist.destroy_process_group()


def main() -> None:
    if torch.cuda.device_count() < 2:
        raise SystemExit("bench_all_reduce needs two GPUs")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    sizes = tuple(int(a) for a in sys.argv[1:]) or SIZES_KB
    procs = [ctx.Process(target=_rank, args=(r, 29517, queue, sizes)) for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=300)
    for p in procs:
        p.join(60)
    write_json("bench_all_reduce.json", result)
    print(f"{result['device']} x2, bf16, us per all-reduce in CUDA graphs "
          f"(peer path open: {result['peer']}; {result['why_not'] or ''})")  # fmt: skip
    print(f"{'KB':>6}{'NCCL':>10}{'pull':>10}{'push':>10}{'push/NCCL':>11}  same sum")
    for r in result["rows"]:
        pull, push = (r.get(f"{how}_us", float("nan")) for how in ("pull", "push"))
        same = f"{r.get('same_sum_pull')} {r.get('same_sum_push')}"
        print(f"{r['kb']:>6}{r['nccl_us']:>10.1f}{pull:>10.1f}{push:>10.1f}"
              f"{push / r['nccl_us']:>11.2f}  {same}")  # fmt: skip


if __name__ == "__main__":
    main()
