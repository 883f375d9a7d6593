"""Whether a decode-only step's attention overlaps its GEMMs when the batch runs as two
nano-batches on two streams (GPU).

An offline decode-only step of the Mistral-7B shape carries some 460 sequences of ~600
tokens: per layer its GEMMs are compute-bound and its split-K attention reads the cache at
copy bandwidth, one after the other. Split the batch in two halves whose layers run on two
streams, and one half's attention may run beside the other half's GEMMs, at the price of
reading the weights twice. Timed here on random bf16 weights and a random paged cache,
LAYERS layers captured in one CUDA graph (weights cycled, so each layer's are L2-cold):

- whole: the whole batch, each layer's qkv, attention, o, gate_up and down in one stream;
- halves: the two halves one after the other in one stream (the weights read twice);
- streams: the two halves on two streams, forked and joined inside the graph.

- streams_cN: the same, captured with the cuBLAS GEMMs held to all but N SMs
  (`--carveout N ...`, torch's `_set_sm_carveout_experimental`), so that the other
  stream's attention finds SMs free beside them.

    python scripts/bench_overlap.py [--batch 464] [--context 576] [--carveout 16 32 48]
"""

from __future__ import annotations

import argparse

import torch
from bench_common import replay_ms, write_json
from bench_kernels import BLOCK_SIZE, DTYPE, paged_from_dense

from mii.kernels.decode_attention import decode_attention

HIDDEN, INTER, Q_HEADS, KV_HEADS, DIM = 4096, 14336, 32, 8, 128
LAYERS = 4  # weight sets cycled (each 436 MB of bf16: L2-cold)


class Layer:
    def __init__(self, gen: torch.Generator) -> None:
        def w(n, k):
            return torch.randn(n, k, device="cuda", dtype=DTYPE, generator=gen) * 0.02

        self.qkv = w((Q_HEADS + 2 * KV_HEADS) * DIM, HIDDEN)
        self.o = w(HIDDEN, Q_HEADS * DIM)
        self.gate_up = w(2 * INTER, HIDDEN)
        self.down = w(HIDDEN, INTER)


def make_cache(batch: int, context: int):
    held = -(-context // BLOCK_SIZE) * BLOCK_SIZE
    k, v = (torch.randn(batch, held, KV_HEADS, DIM, device="cuda", dtype=DTYPE) for _ in "kv")
    k_cache, v_cache, tables = paged_from_dense(k, v)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, tables, lens


def layer_forward(x, layer: Layer, cache, rows: slice):
    """One decoder layer's GEMMs and decode attention for the batch rows `rows` (the norms,
    rope and activation left out: they are small beside these)."""
    k_cache, v_cache, tables, lens = cache
    qkv = x @ layer.qkv.t()
    q = qkv[:, : Q_HEADS * DIM].reshape(-1, Q_HEADS, DIM)
    attn = decode_attention(q, k_cache, v_cache, tables[rows], lens[rows], DIM**-0.5)
    h = attn.reshape(-1, Q_HEADS * DIM) @ layer.o.t()
    gu = h @ layer.gate_up.t()
    return gu[:, :INTER] @ layer.down.t()


def forward(x, layers, cache, rows: slice):
    for layer in layers:
        x = layer_forward(x, layer, cache, rows)
    return x


def capture(fn) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles, allocates
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=464)
    ap.add_argument("--context", type=int, default=576)
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--carveout", type=int, nargs="*", default=[], help="SMs the GEMMs leave")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [Layer(gen) for _ in range(LAYERS)]
    cache = make_cache(args.batch, args.context)
    x = torch.randn(args.batch, HIDDEN, device="cuda", dtype=DTYPE, generator=gen) * 0.1
    half = args.batch // 2
    a, b = slice(0, half), slice(half, args.batch)
    side = torch.cuda.Stream()

    def whole():
        forward(x, layers, cache, slice(0, args.batch))

    def halves():
        forward(x[a], layers, cache, a)
        forward(x[b], layers, cache, b)

    def streams():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward(x[b], layers, cache, b)
        forward(x[a], layers, cache, a)
        torch.cuda.current_stream().wait_stream(side)

    runs = [("whole", whole, None), ("halves", halves, None), ("streams", streams, None)]
    runs += [(f"streams_c{n}", streams, n) for n in args.carveout]
    results = {}
    for name, fn, carveout in runs:
        torch._C._set_sm_carveout_experimental(carveout)
        graph = capture(fn)
        torch._C._set_sm_carveout_experimental(None)
        graph.replay()
        results[name] = replay_ms(graph, args.replays) / LAYERS
        del graph
    print(f"{torch.cuda.get_device_name()}  batch {args.batch}  context {args.context}  "
          f"ms a layer (qkv, attention, o, gate_up, down)")  # fmt: skip
    for name, ms in results.items():
        print(f"  {name:<12} {ms:8.3f}   / whole {ms / results['whole']:.2f}")
    write_json("bench_overlap.json", {"device": torch.cuda.get_device_name(), **vars(args),
                                      "ms_per_layer": results})  # fmt: skip


if __name__ == "__main__":
    main()
