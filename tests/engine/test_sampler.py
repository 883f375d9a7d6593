"""The batched sampler: greedy, filters, penalties, seeds independent of the batch."""

from __future__ import annotations

import math

import pytest
import torch

from mii.engine.sampler import Sampler, gumbel_noise
from mii.engine.sampling_params import SamplingParams
from mii.engine.sequence import Sequence

V = 50


def seqs_of(*params: SamplingParams, tokens=(1, 2, 3), generated=0) -> list[Sequence]:
    out = []
    for i, p in enumerate(params):
        s = Sequence(str(i), list(tokens), p, i, seed=1234 + i)
        s.token_ids.extend([5] * generated)
        out.append(s)
    return out


def test_greedy_is_argmax():
    logits = torch.randn(4, V)
    out = Sampler([0])(logits, seqs_of(*[SamplingParams(max_new_tokens=4)] * 4))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_reduce_to_greedy():
    logits = torch.randn(6, V)
    params = [SamplingParams(max_new_tokens=4, temperature=1.0, top_k=1)] * 3
    params += [SamplingParams(max_new_tokens=4, temperature=1.0, top_p=1e-6)] * 3
    out = Sampler([0])(logits, seqs_of(*params))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_same_seed_same_token_whatever_the_batch():
    logits = torch.randn(1, V)
    p = SamplingParams(max_new_tokens=4, temperature=1.0, seed=7)
    alone = Sampler([0])(logits, seqs_of(p)).token_ids.item()
    crowd = seqs_of(SamplingParams(max_new_tokens=4, temperature=0.7), p)
    crowd[1].seed = crowd[0].seed = seqs_of(p)[0].seed  # same seed, other position
    logits2 = torch.cat([torch.randn(1, V), logits])
    assert Sampler([0])(logits2, crowd).token_ids[1].item() == alone


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2] + [0.0] * (V - 3))
    logits = probs.log().expand(4000, V).contiguous()
    ps = [SamplingParams(max_new_tokens=4, temperature=1.0)] * 4000
    seqs = seqs_of(*ps)
    for i, s in enumerate(seqs):
        s.seed = i
    counts = torch.bincount(Sampler([0])(logits, seqs).token_ids, minlength=V)[:3] / 4000
    assert torch.allclose(counts, probs[:3], atol=0.03)


def test_gumbel_noise_is_gumbel_and_decorrelated():
    g = gumbel_noise(torch.arange(64), torch.zeros(64, dtype=torch.int64), 1000)
    assert abs(g.mean().item() - 0.5772) < 0.02  # Euler-Mascheroni
    assert abs(g.var().item() - math.pi**2 / 6) < 0.05
    g2 = gumbel_noise(torch.arange(64), torch.ones(64, dtype=torch.int64), 1000)
    assert abs(torch.corrcoef(torch.stack([g.flatten(), g2.flatten()]))[0, 1]) < 0.02


def test_min_p_drops_unlikely_tokens():
    logits = torch.tensor([[5.0, 4.9, 0.0] + [-10.0] * (V - 3)]).expand(300, V).contiguous()
    seqs = seqs_of(*[SamplingParams(max_new_tokens=4, temperature=1.0, min_p=0.5)] * 300)
    for i, s in enumerate(seqs):
        s.seed = i
    assert set(Sampler([0])(logits, seqs).token_ids.tolist()) == {0, 1}


def test_min_new_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(1, V)
    logits[0, 9] = 10.0
    logits[0, 8] = 9.0
    logits[0, 7] = 8.0
    p = SamplingParams(max_new_tokens=9, min_new_tokens=2, stop_token_ids=(8,))
    assert Sampler([9])(logits, seqs_of(p, generated=1)).token_ids.item() == 7
    assert Sampler([9])(logits, seqs_of(p, generated=2)).token_ids.item() == 9


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, V)
    p = SamplingParams(max_new_tokens=4, repetition_penalty=1.3)
    seqs = seqs_of(p, p, tokens=(3, 4, 4, 10))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[3, 4, 4, 10]] * 2), logits)
    out = Sampler([0])(logits.clone(), seqs)
    assert out.token_ids.tolist() == expected.argmax(-1).tolist()
    got = Sampler([0])._apply_penalties(logits.clone(), seqs)
    assert torch.allclose(got, expected)


@pytest.mark.parametrize("k", [0, 3])
def test_logprobs_are_log_softmax_of_the_model_logits(k):
    logits = torch.randn(2, V)
    p = SamplingParams(max_new_tokens=4, logprobs=k)
    out = Sampler([0])(logits, seqs_of(p, p))
    ref = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1))
    if k:
        assert torch.allclose(out.top_logprobs, ref.topk(k).values)


def _reference_penalties(logits, seqs):
    """Plain torch, one row at a time: logit bias, then OpenAI's presence and frequency
    penalties over the generated tokens."""
    out = logits.clone()
    for row, s in enumerate(seqs):
        for token, bias in s.params.logit_bias:
            out[row, token] += bias
        generated = torch.tensor(s.generated_token_ids, dtype=torch.int64)
        counts = torch.bincount(generated, minlength=V).float()
        out[row] -= s.params.frequency_penalty * counts
        out[row] -= s.params.presence_penalty * (counts > 0).float()
    return out


def test_presence_frequency_and_logit_bias_match_a_plain_reference():
    torch.manual_seed(0)
    logits = torch.randn(4, V)
    params = [
        SamplingParams(max_new_tokens=9, presence_penalty=0.7, frequency_penalty=0.3),
        SamplingParams(max_new_tokens=9, logit_bias=((4, 5.0), (7, -100.0))),
        SamplingParams(max_new_tokens=9),  # untouched beside the others
        SamplingParams(max_new_tokens=9, frequency_penalty=-1.5, logit_bias=((4, 1.0),)),
    ]
    seqs = seqs_of(*params, tokens=(4, 4, 9))  # prompt tokens do not count
    for s, generated in zip(seqs, ([4, 4, 7], [4], [4], [7, 7, 7, 4]), strict=True):
        s.token_ids.extend(generated)
    got = Sampler([0])._apply_penalties(logits.clone(), seqs)
    assert torch.allclose(got, _reference_penalties(logits, seqs))
    assert torch.equal(got[2], logits[2])
    out = Sampler([0])(logits.clone(), seqs)
    assert out.token_ids.tolist() == got.argmax(-1).tolist()


def test_penalties_make_the_engine_step_synchronously():
    assert SamplingParams(max_new_tokens=1, presence_penalty=0.5).needs_history
    assert SamplingParams(max_new_tokens=1, repetition_penalty=1.1).needs_history
    assert not SamplingParams(max_new_tokens=1, logit_bias=((1, 2.0),)).needs_history
