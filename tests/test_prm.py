"""ImplicitPRM end to end on the tiny random Llamas from conftest (PRM = seed 1, reference = seed 0)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prm_ray.scoring import ImplicitPRM, StepScores
from prm_ray.tokens import render_prompt

BETA = 0.5
PROMPTS = ["What is 1+1?", "Add 2 and 3.", "x", "Compute 7*6.", "Say hi.", "Q?", "Sum 1..4"]
RESPONSES = [
    "1+1 = 2.\n\nThe answer is \\boxed{2}.",
    "2 + 3 = 5\n\n\nSo 5.",
    "",  # empty response: scored from its EOS token
    "\n\n7*6 = 42\n\n \n\nAnswer: 42\n\n",
    "hi",
    "Step 1.\n\nStep 2.\n\nStep 3.\n\nStep 4.",
    "1+2+3+4\n\n= 10",
]


@pytest.fixture(scope="module")
def prm(tiny_prm_path, tiny_policy_path) -> ImplicitPRM:
    return ImplicitPRM.from_pretrained(tiny_prm_path, ref_path=tiny_policy_path, beta=BETA)


def _sum_logp(model, tok, prompt: str, response: str) -> float:
    """Independent reference: sum of log pi(response tokens + EOS | prompt), one sequence at a time."""
    p = tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logp[i - 1, ids[0, i]].item() for i in range(len(p), len(p) + len(r)))


def test_batch_size_invariant_and_order_preserving(prm):
    one = prm.score(PROMPTS, RESPONSES, batch_size=1)
    seven = prm.score(PROMPTS, RESPONSES, batch_size=7)
    three = prm.score(PROMPTS, RESPONSES, batch_size=3)
    assert all(isinstance(s, StepScores) for s in one)
    for a, b, c, resp in zip(one, seven, three, RESPONSES):
        assert a.steps == b.steps == c.steps and "".join(a.steps) == resp
        assert a.num_tokens == b.num_tokens == len(resp) + 1  # char tokenizer + EOS
        for other in (b, c):
            for field in ("step_rewards", "q_values", "token_rewards"):
                torch.testing.assert_close(torch.tensor(getattr(a, field)), torch.tensor(getattr(other, field)),
                                           rtol=0, atol=1e-5)
            assert a.score == pytest.approx(other.score, abs=1e-5)
    # order: the lone item scored on its own equals its slot in the batch
    for i in (0, 2, 5):
        alone = prm.score([PROMPTS[i]], [RESPONSES[i]])[0]
        assert alone.score == pytest.approx(seven[i].score, abs=1e-5)
        assert alone.steps == seven[i].steps


def test_steps_q_values_and_aggregations(prm):
    res = prm.score(PROMPTS, RESPONSES, batch_size=4)
    assert res[0].steps == ["1+1 = 2.\n\n", "The answer is \\boxed{2}."]
    assert res[1].steps == ["2 + 3 = 5\n\n\n", "So 5."]
    assert res[2].steps == [""] and res[2].num_tokens == 1  # just the EOS
    assert res[3].steps == ["\n\n7*6 = 42\n\n \n\n", "Answer: 42\n\n"]
    assert len(res[5].steps) == 4
    for s in res:
        assert s.aggregation == "min"
        assert s.score == min(s.step_rewards)
        assert s.q_values[-1] == pytest.approx(sum(s.step_rewards), abs=1e-5)
        assert sum(s.step_rewards) == pytest.approx(sum(s.token_rewards), abs=1e-5)
        assert len(s.token_rewards) == s.num_tokens
    # the reward of an empty response is its EOS token's reward
    assert res[2].score == pytest.approx(res[2].token_rewards[0], abs=1e-7)
    for method in ("sum", "last_q", "mean"):
        other = prm.score(PROMPTS[:2], RESPONSES[:2], aggregation=method)
        assert all(o.aggregation == method for o in other)
    with pytest.raises(ValueError, match="min, sum, last_q, mean"):
        prm.score(PROMPTS[:1], RESPONSES[:1], aggregation="max")


def test_last_q_is_the_outcome_reward(prm, tiny_prm_path, tiny_policy_path):
    tok = AutoTokenizer.from_pretrained(tiny_prm_path)
    phi = AutoModelForCausalLM.from_pretrained(tiny_prm_path).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_policy_path).eval()
    got = prm.score(PROMPTS, RESPONSES, aggregation="last_q", batch_size=7)
    for p, r, s in zip(PROMPTS, RESPONSES, got):
        expected = BETA * (_sum_logp(phi, tok, p, r) - _sum_logp(ref, tok, p, r))
        assert s.score == pytest.approx(expected, abs=1e-4)
        assert abs(expected) > 1e-3  # the two random models really differ

    no_ref = ImplicitPRM.from_pretrained(tiny_prm_path, beta=BETA, aggregation="last_q")
    for p, r, s in zip(PROMPTS[:3], RESPONSES[:3], no_ref.score(PROMPTS[:3], RESPONSES[:3])):
        assert s.score == pytest.approx(BETA * _sum_logp(phi, tok, p, r), abs=1e-4)


def test_identical_prm_and_reference_give_exactly_zero(tiny_policy_path):
    same = ImplicitPRM.from_pretrained(tiny_policy_path, ref_path=tiny_policy_path, beta=BETA)
    for s in same.score(PROMPTS, RESPONSES, batch_size=3):
        assert all(x == 0.0 for x in s.token_rewards + s.step_rewards + s.q_values)
        assert s.score == 0.0


def test_chat_template_off_uses_prompt_as_is(prm):
    rendered = render_prompt(prm.tokenizer, PROMPTS[0])
    a = prm.score([PROMPTS[0]], [RESPONSES[0]])[0]
    b = prm.score([rendered], [RESPONSES[0]], chat_template=False)[0]
    assert a.score == pytest.approx(b.score, abs=1e-6)
    c = prm.score([PROMPTS[0]], [RESPONSES[0]], chat_template=False)[0]
    assert c.score != pytest.approx(a.score, abs=1e-6)


def test_too_long_input_is_an_error_not_truncated(prm):
    with pytest.raises(ValueError, match=r"item 1 is too long.*> max_position_embeddings 256"):
        prm.score(["ok", "long"], ["fine", "x" * 300])
    with pytest.raises(ValueError, match="prompts"):
        prm.score(["a", "b"], ["c"])


def test_reference_with_a_different_tokenizer_is_rejected(tiny_prm_path, tiny_policy_path, tmp_path):
    other = tmp_path / "other_ref"
    shutil.copytree(tiny_policy_path, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="tokenizers .* differ"):
        ImplicitPRM.from_pretrained(tiny_prm_path, ref_path=str(other))


def test_score_tokenized_reuses_encode(prm):
    items = [prm.encode(p, r, index=i) for i, (p, r) in enumerate(zip(PROMPTS[:3], RESPONSES[:3]))]
    assert items[0].num_response_tokens == len(RESPONSES[0]) + 1
    assert items[0].input_ids[-1] == prm.tokenizer.eos_token_id
    direct = prm.score_tokenized(items)
    via_score = prm.score(PROMPTS[:3], RESPONSES[:3])
    for a, b in zip(direct, via_score):
        assert a.score == pytest.approx(b.score, abs=1e-5)
    batch = prm.collate(items)
    tr = prm.token_rewards(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    assert tr.shape == batch["input_ids"].shape
    assert (tr[~batch["response_mask"]] == 0).all()
