"""Kernels: Triton implementations for CUDA, and the torch references that define them.

`torch_ref` holds the reference of every kernel; it is also the engine's CPU backend, so it
is vectorised (no per-token Python loops). The engine calls `dispatch`, which imports the
Triton modules (and triton) only when it meets a CUDA tensor.
"""
