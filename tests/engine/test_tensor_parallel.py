"""Tensor parallelism on the CPU (gloo): greedy output at TP>1 equals TP=1 token for token in
fp32; a dead rank makes rank 0 fail fast and clearly; the ranks stop with their engine."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from tiny_models import ALL_ARCHS, BOS, EOS, byte_tokenizer, mixed_prompts

import mii
from mii.engine.step_plan import StepPlan
from mii.errors import TensorParallelError

GREEDY = dict(do_sample=False)


@contextmanager
def pipeline(path: str, **kwargs):
    pipe = mii.pipeline(path, **kwargs)
    try:
        yield pipe
    finally:
        pipe.destroy()


def greedy(path: str, prompts, new_tokens: int, **kwargs) -> list[list[int]]:
    with pipeline(path, **kwargs) as pipe:
        out = pipe(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **GREEDY)
    return [r.token_ids for r in out]


def no_rank_processes_left() -> bool:
    return not [p for p in multiprocessing.active_children() if p.name.startswith("mii-tp-")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_tp2_matches_tp1(tiny_model, arch):
    path = tiny_model(arch)
    # Budget 32: the 70-token prompt runs in chunks beside decodes of the others.
    prompts = mixed_prompts(4, (1, 17, 70, 5), seed=len(arch))
    expected = greedy(path, prompts, 12, max_num_batched_tokens=32)
    assert greedy(path, prompts, 12, max_num_batched_tokens=32, tensor_parallel=2) == expected
    assert no_rank_processes_left()


def _tiny_llama_one_kv_head(folder: str) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=321,  # odd: the last rank's vocabulary slice is padded
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,  # fewer KV heads than ranks: each rank keeps a copy
        max_position_embeddings=1024,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.timeout(60)
def test_one_kv_head_and_odd_vocab_with_long_steps(tmp_path):
    path = _tiny_llama_one_kv_head(str(tmp_path))
    # Budget 512 with long prompts: step plans longer than the control channel's first
    # broadcast, so they travel in two.
    prompts = mixed_prompts(3, (300, 180, 7), vocab=321, seed=5)
    expected = greedy(path, prompts, 10, max_num_batched_tokens=512)
    with pipeline(path, max_num_batched_tokens=512, tensor_parallel=2) as pipe:
        attn = pipe.engine.runner.model.model.layers[0].self_attn
        assert (attn.qkv_proj.num_kv_heads, attn.qkv_proj.kv_replicas) == (1, 2)
        assert pipe.engine.runner.model.lm_head.per_rank == 161
        got = pipe(prompts, max_new_tokens=10, min_new_tokens=10, **GREEDY)
    assert [r.token_ids for r in got] == expected


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_smollm2_tp3_matches_tp1(smollm2_path):
    # SmolLM2-135M has 9 query and 3 KV heads: TP=3 splits it, TP=2 does not.
    texts = ["The capital of France is", "def fibonacci(n):"]
    tok = byte_tokenizer()  # any ids do for parity; spares loading the real tokenizer here
    prompts = [tok.encode(t) for t in texts]
    expected = greedy(smollm2_path, prompts, 4)
    assert greedy(smollm2_path, prompts, 4, tensor_parallel=3) == expected


@pytest.mark.timeout(30)
def test_model_that_does_not_split_fails_before_any_rank_starts(smollm2_path):
    with pytest.raises(ValueError, match=r"attention heads \(9\).*tensor_parallel=2"):
        mii.pipeline(smollm2_path, tensor_parallel=2)
    assert no_rank_processes_left()


@pytest.mark.timeout(60)
def test_killed_rank_fails_the_step_within_seconds(tiny_model):
    with pipeline(tiny_model("llama"), tensor_parallel=2) as pipe:
        group = pipe.engine.runner.group
        stream = pipe.stream([5, 6, 7], max_new_tokens=900, min_new_tokens=900, **GREEDY)
        for _ in range(3):
            next(stream)
        os.kill(group.pids[0], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) exited with code -9"):
            for _ in stream:
                pass
        assert time.monotonic() - start < 10
        with pytest.raises(TensorParallelError):  # and every later call, at once
            pipe([5, 6], max_new_tokens=2)
    assert no_rank_processes_left()


@pytest.mark.timeout(60)
def test_ranks_exit_when_rank0_dies(tiny_model):
    script = textwrap.dedent(
        f"""
        import os, signal
        import mii
        pipe = mii.pipeline({tiny_model("llama")!r}, tensor_parallel=2)
        pipe([5, 6, 7], max_new_tokens=2)
        print(pipe.engine.runner.group.pids[0], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    # The script has no `if __name__ == "__main__":` guard: spawned ranks must not rerun it.
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=50
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    rank_pid = int(proc.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while _alive(rank_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(rank_pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(30)
def test_failure_while_loading_leaves_no_rank_behind(tiny_model, tmp_path):
    import shutil

    path = tmp_path / "broken"
    shutil.copytree(tiny_model("qwen2"), path)
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        mii.pipeline(str(path), tensor_parallel=2)
    assert no_rank_processes_left()


def test_peer_all_reduce_setting_defaults_on_and_stops_at_the_validated_size(monkeypatch):
    from mii.engine.tp import peer_all_reduce as peer

    monkeypatch.delenv("MII_PEER_ALL_REDUCE_MAX_BYTES", raising=False)
    assert peer.max_bytes_setting() == peer.DEFAULT_MAX_BYTES == 512 * 1024
    monkeypatch.setenv("MII_PEER_ALL_REDUCE_MAX_BYTES", str(4 << 20))
    assert peer.max_bytes_setting() == peer.LARGEST_BYTES
    monkeypatch.setenv("MII_PEER_ALL_REDUCE_MAX_BYTES", "0")
    assert peer.max_bytes_setting() == 0


def test_step_plan_round_trip():
    rng = np.random.default_rng(0)
    plan = StepPlan(
        input_ids=rng.integers(0, 100, 7),
        positions=np.arange(7, dtype=np.int64),
        slot_mapping=rng.integers(0, 99, 7),
        block_tables=rng.integers(0, 50, (3, 4)).astype(np.int32),
        query_start_loc=np.array([0, 1, 2, 7], dtype=np.int32),
        seq_lens=np.array([9, 4, 5], dtype=np.int32),
        logits_indices=np.array([0, 1, 6]),
    )
    back = StepPlan.unpack(plan.pack())
    for name in plan.__dataclass_fields__:
        a, b = getattr(plan, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert (back.max_query_len, back.max_seq_len) == (5, 9)


def test_device_map_places_replicas():
    from mii.config import ModelConfig

    config = ModelConfig(model_name_or_path="m", tensor_parallel=2, device_map=[[2, 3], [0, 1]])
    assert config.to_engine_config(replica=1).device_ids == (0, 1)
    auto = ModelConfig(model_name_or_path="m", tensor_parallel=2)
    assert auto.to_engine_config().device_ids is None
    assert auto.to_engine_config(replica=1).device_ids == (2, 3)
    with pytest.raises(ValueError, match="needs 2"):
        ModelConfig(model_name_or_path="m", tensor_parallel=2, device_map=[0]).to_engine_config()


# ---- on two GPUs (NCCL for the model, gloo for the step plans) -------------------------
needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("arch", ["llama3", "qwen2", "opt350", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.gpu
@needs_two_gpus
def test_gpu_tp2_matches_tp1(tiny_model, arch, eager):
    path = tiny_model(arch)
    prompts = mixed_prompts(6, (1, 17, 70, 5, 130, 2), seed=len(arch))
    opts = dict(device="cuda", dtype="float32", max_num_batched_tokens=64, enforce_eager=eager)
    expected = greedy(path, prompts, 16, **opts)
    assert greedy(path, prompts, 16, tensor_parallel=2, **opts) == expected


@pytest.mark.timeout(180)
@pytest.mark.gpu
@needs_two_gpus
def test_gpu_killed_rank_fails_the_step_within_seconds(tiny_model):
    with pipeline(tiny_model("llama"), tensor_parallel=2, device="cuda") as pipe:
        assert pipe.engine.runner.kv_cache.device == torch.device("cuda", 0)
        stream = pipe.stream([5, 6, 7], max_new_tokens=900, min_new_tokens=900, **GREEDY)
        for _ in range(3):
            next(stream)
        os.kill(pipe.engine.runner.group.pids[0], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match="rank 1"):
            for _ in stream:
                pass
        assert time.monotonic() - start < 30
    assert no_rank_processes_left()


@pytest.mark.timeout(180)
@pytest.mark.gpu
@needs_two_gpus
def test_gpu_device_map_places_rank0(tiny_model):
    with pipeline(tiny_model("llama"), tensor_parallel=2, device_map=[[1, 0]]) as pipe:
        assert pipe.engine.runner.kv_cache.device == torch.device("cuda", 1)
        (resp,) = pipe([5, 6, 7], max_new_tokens=4)
        assert resp.generated_length == 4


@pytest.mark.timeout(240)
@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("arch", ["llama3", "mixtral"])
@pytest.mark.parametrize(
    "norm, push", [("0", "1"), ("0", "0"), ("1", "1")], ids=["plain", "pull", "with-norm"]
)
def test_gpu_peer_all_reduce_takes_decode_steps_and_changes_no_token(
    tiny_model, monkeypatch, arch, norm, push
):
    """Small all-reduces go through NVLink peer memory (one shot, pushed or pulled), and sum
    as NCCL does; a Mixtral layer's sum over its top-k experts rides in the same launch, and
    with MII_PEER_ALL_REDUCE_NORM=1 the residual add and RMSNorm after it (and the output and
    down projections' one-row GEMVs send their rows to the peer themselves)."""
    path = tiny_model(arch)
    prompts = mixed_prompts(6, (1, 17, 70, 5, 130, 2), seed=3)
    opts = dict(device="cuda", dtype="bfloat16", max_num_batched_tokens=64, tensor_parallel=2)
    monkeypatch.setenv("MII_PEER_ALL_REDUCE_MAX_BYTES", str(512 * 1024))
    monkeypatch.setenv("MII_PEER_ALL_REDUCE_NORM", norm)
    monkeypatch.setenv("MII_PEER_ALL_REDUCE_PUSH", push)
    gemvs = pushed_gemv_calls(monkeypatch)  # rank 0's, this process's: the graphs' captures too
    with pipeline(path, **opts) as pipe:
        assert pipe.engine.runner.tp.peer is not None
        assert pipe.engine.runner.tp.peer.buffers.push == (push == "1")
        assert (pipe.engine.runner.tp.peer.norm_buffers is not None) == (norm == "1")
        o_proj = pipe.engine.runner.model.model.layers[0].self_attn.o_proj
        assert (o_proj.push_to is not None) == (norm == "1")
        with_peer = [r.token_ids for r in pipe(prompts, max_new_tokens=16, **GREEDY)]
        # one sequence: its decode steps' one-row projections go through the GEMV (pushing
        # its rows with the norm on)
        alone = pipe(prompts[2:3], max_new_tokens=16, **GREEDY)[0].token_ids
        assert (gemvs["pushed"] > 0) == (norm == "1") and gemvs["all"] > 0
    monkeypatch.setenv("MII_PEER_ALL_REDUCE_MAX_BYTES", "0")
    with pipeline(path, **opts) as pipe:
        assert pipe.engine.runner.tp.peer is None
        assert [r.token_ids for r in pipe(prompts, max_new_tokens=16, **GREEDY)] == with_peer
        assert pipe(prompts[2:3], max_new_tokens=16, **GREEDY)[0].token_ids == alone


def pushed_gemv_calls(monkeypatch) -> dict:
    """Counts of this process's GEMV calls from here on: all, and those pushing rows."""
    from mii.kernels import gemv

    counts, launch = {"all": 0, "pushed": 0}, gemv.gemv

    def counted(*args, push=None, **kwargs):
        counts["all"] += 1
        counts["pushed"] += push is not None
        return launch(*args, push=push, **kwargs)

    monkeypatch.setattr(gemv, "gemv", counted)
    return counts
