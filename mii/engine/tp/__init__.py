"""Tensor parallelism: one group of processes runs one model, each rank a shard.

context.py   `ParallelContext`: the group as TP-aware layers see it (rank, size, collectives)
group.py     what every rank shares: rendezvous, the process group, the control channel
leader.py    rank 0: spawns the other ranks and sends them each step's plan
follower.py  ranks 1..N-1: run every step the leader sends until it says stop
"""
