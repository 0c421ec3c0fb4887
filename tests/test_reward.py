"""The reward math: Prop. 3.1/3.2 by exhaustive enumeration, log-prob alignment, steps, aggregation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prm_ray.core.reward import (
    AGGREGATIONS,
    aggregate,
    implicit_reward,
    q_values,
    response_logprobs,
    step_ids_from_offsets,
    step_rewards,
    token_q_values,
    token_rewards,
)


def _tiny_llama(seed: int, vocab: int, dtype=torch.float64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        initializer_range=0.5,  # peaked, seed-dependent distributions -> rewards far from 0
        pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


# ---------------------------------------------------------------------------------------------
# Proposition 3.1 and 3.2, by enumerating every continuation
# ---------------------------------------------------------------------------------------------

VOCAB, T_LEN, PROMPT = 3, 4, [2, 0, 1]


@pytest.fixture(scope="module")
def enumeration():
    """All VOCAB**T_LEN continuations; the project's log-probs and naive per-prefix conditionals."""
    pi, ref = _tiny_llama(1, VOCAB), _tiny_llama(2, VOCAB)
    seqs = list(itertools.product(range(VOCAB), repeat=T_LEN))
    P = len(PROMPT)
    ids = torch.tensor([PROMPT + list(s) for s in seqs])
    attn = torch.ones_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, P:] = True
    with torch.no_grad():
        project = {name: response_logprobs(m, ids, attn, mask) for name, m in (("pi", pi), ("ref", ref))}

        # Independent ground truth: log pi(y_i | prompt, y_<i) from a forward over each prefix,
        # reading only the LAST position's logits (no shifting or masking involved).
        def conditionals(model):
            table = torch.empty(len(seqs), T_LEN, dtype=torch.float64)
            for i in range(T_LEN):
                prefixes = sorted({s[:i] for s in seqs})
                x = torch.tensor([PROMPT + list(p) for p in prefixes])
                last = torch.log_softmax(model(input_ids=x).logits[:, -1].double(), -1)
                lookup = {p: last[k] for k, p in enumerate(prefixes)}
                for row, s in enumerate(seqs):
                    table[row, i] = lookup[s[:i]][s[i]]
            return table

        naive = {"pi": conditionals(pi), "ref": conditionals(ref)}
    return seqs, mask, project, naive


def test_response_logprobs_matches_naive_prefix_conditionals(enumeration):
    seqs, mask, project, naive = enumeration
    P = len(PROMPT)
    for name in ("pi", "ref"):
        torch.testing.assert_close(project[name][:, P:], naive[name], rtol=0, atol=1e-10)
        assert (project[name][:, :P] == 0).all()
        # a proper distribution over the length-T continuations
        assert torch.logsumexp(naive[name].sum(1), 0).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_prop_3_1_q_is_exponential_average_of_outcome_reward(enumeration, beta):
    """q^t = beta * log E_{pi_ref(y | y_<=t)} exp(r(y) / beta) for every prefix length t (eq. 2)."""
    seqs, mask, project, naive = enumeration
    P = len(PROMPT)
    tok_r = token_rewards(project["pi"], project["ref"], mask, beta)
    q = token_q_values(tok_r, mask)[:, P:]  # q[:, t-1] = q^t
    r = beta * (naive["pi"] - naive["ref"]).sum(1)  # outcome reward of each full sequence
    torch.testing.assert_close(implicit_reward(tok_r, mask), r, rtol=0, atol=1e-10)

    for t in range(T_LEN + 1):
        groups: dict[tuple, list[int]] = {}
        for row, s in enumerate(seqs):
            groups.setdefault(s[:t], []).append(row)
        for rows in groups.values():
            rows_t = torch.tensor(rows)
            # log pi_ref(y | y_<=t) = sum of the reference's conditionals after position t
            log_p_cont = naive["ref"][rows_t, t:].sum(1)
            expected = beta * torch.logsumexp(log_p_cont + r[rows_t] / beta, 0)
            got = torch.zeros((), dtype=torch.float64) if t == 0 else q[rows_t, t - 1]
            # every sequence sharing the prefix has the same q^t
            torch.testing.assert_close(got, expected.expand_as(got), rtol=0, atol=1e-5)

            # Prop. 3.2: E_ref[r | y_<=t] <= q^t <= max r over continuations of y_<=t
            soft = (log_p_cont.exp() * r[rows_t]).sum()
            hard = r[rows_t].max()
            assert soft - 1e-9 <= expected <= hard + 1e-9
            if t > 0:
                assert (soft - 1e-9 <= got).all() and (got <= hard + 1e-9).all()


# ---------------------------------------------------------------------------------------------
# response_logprobs on a right-padded batch
# ---------------------------------------------------------------------------------------------


class _TensorLM(torch.nn.Module):
    """A causal LM that returns a bare logits tensor and knows nothing of logits_to_keep."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


def _padded_batch(pad_id: int):
    rows = [([5, 6, 7], [8, 9, 10, 11]), ([5], [12, 13]), ([5, 14, 15, 16, 17], [18])]
    L = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), L), pad_id)
    attn = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[b, :n] = torch.tensor(p + r)
        attn[b, :n] = 1
        mask[b, len(p):n] = True
    return rows, ids, attn, mask


def test_response_logprobs_padded_batch_equals_one_at_a_time():
    model = _tiny_llama(3, vocab=20, dtype=torch.float32)
    rows, ids, attn, mask = _padded_batch(pad_id=0)
    with torch.no_grad():
        batched = response_logprobs(model, ids, attn, mask)
        for b, (p, r) in enumerate(rows):
            seq = torch.tensor([p + r])
            logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
            expected = torch.zeros(ids.shape[1])
            for i in range(len(p), len(p) + len(r)):
                expected[i] = logp[i - 1, seq[0, i]]
            torch.testing.assert_close(batched[b], expected, rtol=0, atol=1e-5)
        # padding content is irrelevant; a model without logits_to_keep gives the same answer
        _, ids2, _, _ = _padded_batch(pad_id=19)
        torch.testing.assert_close(response_logprobs(model, ids2, attn, mask), batched, rtol=0, atol=1e-6)
        torch.testing.assert_close(response_logprobs(_TensorLM(model), ids, attn, mask), batched,
                                   rtol=0, atol=1e-6)


def test_response_logprobs_is_differentiable_and_rejects_response_at_token_0():
    model = _tiny_llama(4, vocab=20, dtype=torch.float32)
    _, ids, attn, mask = _padded_batch(pad_id=0)
    response_logprobs(model, ids, attn, mask).sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    bad = mask.clone()
    bad[0, 0] = True
    with pytest.raises(ValueError, match="token 0"):
        response_logprobs(model, ids, attn, bad)


def test_token_rewards_with_and_without_reference():
    logp = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -9.0]])
    mask = torch.tensor([[False, True, True, False]])
    torch.testing.assert_close(token_rewards(logp, ref, mask, 0.5), torch.tensor([[0.0, 0.25, -0.5, 0.0]]))
    torch.testing.assert_close(token_rewards(logp, None, mask, 0.5), torch.tensor([[0.0, -0.5, -1.0, 0.0]]))
    tr = token_rewards(logp, ref, mask, 0.5)
    torch.testing.assert_close(implicit_reward(tr, mask), torch.tensor([-0.25]))
    torch.testing.assert_close(token_q_values(tr, mask), torch.tensor([[0.0, 0.25, -0.25, 0.0]]))


# ---------------------------------------------------------------------------------------------
# Step splitting
# ---------------------------------------------------------------------------------------------


def _chars(text: str) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(len(text))]


def _eos(text: str) -> list[tuple[int, int]]:
    return _chars(text) + [(len(text), len(text))]


@pytest.mark.parametrize(
    "text, steps",
    [
        ("a\n\nb\n\nc", ["a\n\n", "b\n\n", "c"]),  # the regular case
        ("one step only.", ["one step only."]),  # no separator
        ("a\n\nb\n\n", ["a\n\n", "b\n\n"]),  # trailing separator stays with the last step
        ("\n\na\n\nb", ["\n\na\n\n", "b"]),  # leading separator folds into the first step
        ("a\n\n\nb", ["a\n\n\n", "b"]),  # odd run of newlines: extra whitespace to the left
        ("a\n\n\n\n\n\nb", ["a\n\n\n\n\n\n", "b"]),  # run of separators: no empty steps
        ("a\n\n \n\nb", ["a\n\n \n\n", "b"]),  # whitespace-only segment
        ("a\n\n  b", ["a\n\n  ", "b"]),  # indentation after a separator goes with the separator
        ("\n\n", ["\n\n"]),  # separator only: one step
        ("  \n", ["  \n"]),  # whitespace only: one step
        ("a\nb", ["a\nb"]),  # single newline is not a separator
    ],
)
def test_step_splitting_char_tokens_with_eos(text, steps):
    ids, texts = step_ids_from_offsets(text, _eos(text))
    assert texts == steps
    assert "".join(texts) == text
    # each char token is in the step that contains it; EOS joins the last step
    starts = [sum(map(len, steps[:k])) for k in range(len(steps))]
    expected = [max(k for k, s in enumerate(starts) if s <= i) for i in range(len(text))]
    assert ids == expected + [len(steps) - 1]


def test_step_splitting_without_eos_and_empty_response():
    assert step_ids_from_offsets("a\n\nb", _chars("a\n\nb")) == ([0, 0, 0, 1], ["a\n\n", "b"])
    assert step_ids_from_offsets("", [(0, 0)]) == ([0], [""])  # empty response + EOS: one step
    assert step_ids_from_offsets("", []) == ([], [])
    with pytest.raises(ValueError):
        step_ids_from_offsets("ab", [(0, 3)])


def test_step_splitting_multichar_tokens_across_the_separator():
    # ".\n\n" ends step 0 (its last char is in the separator)
    assert step_ids_from_offsets("ab.\n\ncd", [(0, 2), (2, 5), (5, 7), (7, 7)]) == (
        [0, 0, 1, 1], ["ab.\n\n", "cd"])
    # "\n\nc" belongs to the step containing its last character, the next step
    assert step_ids_from_offsets("ab\n\ncd", [(0, 2), (2, 5), (5, 6)]) == ([0, 1, 1], ["ab\n\n", "cd"])
    # a token swallowing a whole step: that step gets no token and merges into the next one
    assert step_ids_from_offsets("a\n\nb\n\nc", [(0, 5), (5, 7)]) == ([0, 1], ["a\n\nb\n\n", "c"])
    # a leading zero-width token joins the first real token's step
    assert step_ids_from_offsets("a\n\nb", [(0, 0), (0, 4)]) == ([0, 0], ["a\n\nb"])


def test_step_splitting_custom_separator():
    text = "x = 1 ки y = 2 ки"
    ids, texts = step_ids_from_offsets(text, _chars(text), separator=" ки")
    assert texts == ["x = 1 ки ", "y = 2 ки"]
    assert ids == [0] * 9 + [1] * 8


# ---------------------------------------------------------------------------------------------
# Step rewards, q-values, aggregation
# ---------------------------------------------------------------------------------------------


def _hand_batch():
    # row 0: prompt, steps 0,0,1,2 (+ padding); row 1: a single step; row 2: positive rewards only
    tok_r = torch.tensor([
        [9.0, 0.5, -0.2, 0.1, -1.0, 0.0],
        [9.0, 9.0, 0.3, 0.4, 0.0, 0.0],
        [9.0, 2.0, 3.0, 0.0, 0.0, 0.0],
    ])
    step_ids = torch.tensor([
        [-1, 0, 0, 1, 2, -1],
        [-1, -1, 0, 0, -1, -1],
        [-1, 0, 1, -1, -1, -1],
    ])
    return tok_r, step_ids


def test_step_rewards_and_q_values():
    tok_r, step_ids = _hand_batch()
    r, m = step_rewards(tok_r, step_ids)
    torch.testing.assert_close(r, torch.tensor([[0.3, 0.1, -1.0], [0.7, 0.0, 0.0], [2.0, 3.0, 0.0]]))
    assert m.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    torch.testing.assert_close(q_values(r, m), torch.tensor([[0.3, 0.4, -0.6], [0.7, 0.0, 0.0], [2.0, 5.0, 0.0]]))
    r5, m5 = step_rewards(tok_r, step_ids, num_steps=5)
    assert r5.shape == (3, 5) and not m5[:, 3:].any()
    with pytest.raises(ValueError):
        step_rewards(tok_r, step_ids, num_steps=2)


def test_aggregate_methods_and_padding_never_wins_min():
    tok_r, step_ids = _hand_batch()
    r, m = step_rewards(tok_r, step_ids)
    # padded slots hold 0, which is below rows 1 and 2's real rewards: they must not win
    torch.testing.assert_close(aggregate(r, m, "min"), torch.tensor([-1.0, 0.7, 2.0]))
    torch.testing.assert_close(aggregate(r, m, "sum"), torch.tensor([-0.6, 0.7, 5.0]))
    torch.testing.assert_close(aggregate(r, m, "last_q"), aggregate(r, m, "sum"))
    torch.testing.assert_close(aggregate(r, m, "mean"), torch.tensor([-0.2, 0.7, 2.5]))
    # the released eval's accumulative modes, over q = [[0.3, 0.4, -0.6], [0.7], [2.0, 5.0]]
    torch.testing.assert_close(aggregate(r, m, "min_q"), torch.tensor([-0.6, 0.7, 2.0]))
    torch.testing.assert_close(aggregate(r, m, "sum_q"), torch.tensor([0.1, 0.7, 7.0]))
    # the explicit PRM's alternatives: the last step's reward and the product of the step rewards
    torch.testing.assert_close(aggregate(r, m, "last"), torch.tensor([-1.0, 0.7, 3.0]))
    torch.testing.assert_close(aggregate(r, m, "prod"), torch.tensor([0.3 * 0.1 * -1.0, 0.7, 6.0]))
    # garbage in padded slots changes nothing
    noisy = torch.where(m, r, torch.full_like(r, -1e6))
    for method in AGGREGATIONS:
        torch.testing.assert_close(aggregate(noisy, m, method), aggregate(r, m, method))
    # a reward above the reference code's +1e3 padding is still handled exactly
    big = torch.tensor([[2e3, 5e3]]), torch.tensor([[True, True]])
    assert aggregate(*big, "min").item() == 2e3


def test_aggregate_empty_rows_and_unknown_method():
    r = torch.tensor([[0.0, 0.0], [1.5, -0.5]])
    m = torch.tensor([[False, False], [True, True]])
    for method in AGGREGATIONS:
        assert aggregate(r, m, method)[0].item() == 0.0  # no steps: q^0 = 0
    assert aggregate(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool), "min").tolist() == [0.0, 0.0]
    assert step_rewards(torch.zeros(2, 3), torch.full((2, 3), -1))[0].shape == (2, 0)
    with pytest.raises(ValueError, match="min, sum, last_q, mean"):
        aggregate(r, m, "max")
    assert not math.isinf(aggregate(r, m, "min")[1].item())


def test_explicit_step_logits_read_each_step_s_last_token():
    from prm_ray.core.reward import explicit_token_rewards, step_end_index, step_label_logits

    # Two rows: prompt (-1) then steps; row 1 is shorter and right-padded.
    step_ids = torch.tensor([[-1, 0, 0, 1, 1, 1, 2], [-1, -1, 0, 1, 1, -1, -1]])
    index, mask = step_end_index(step_ids)
    assert index.tolist() == [[2, 5, 6], [2, 4, 0]] and mask.tolist() == [[True] * 3, [True, True, False]]
    V, pos, neg = 5, 3, 1
    logits = torch.randn(2, 7, V)
    z, zmask = step_label_logits(logits, step_ids, pos, neg)
    for b in range(2):
        for s in range(3):
            want = logits[b, index[b, s], pos] - logits[b, index[b, s], neg] if mask[b, s] else 0.0
            assert float(z[b, s]) == pytest.approx(float(want))
    # Placed on the last tokens, the step sums give back sigmoid(z): the implicit PRM's step code applies.
    tok = explicit_token_rewards(z, zmask, step_ids)
    summed, smask = step_rewards(tok, step_ids, 3)
    assert torch.allclose(summed[smask], torch.sigmoid(z)[zmask]) and (tok[step_ids < 0] == 0).all()
    assert aggregate(summed, smask, "min")[1] == pytest.approx(float(torch.sigmoid(z[1, :2]).min()))
