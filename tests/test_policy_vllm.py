"""The policy artefacts are ordinary HF files: vLLM loads them and agrees with transformers."""

import gc
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm import LLM, SamplingParams

from prm_ray.core.reward import response_logprobs
from prm_ray.stages.rollout import EngineConfig, engine_environment, llm_kwargs
from prm_ray.tokens import render_prompt


@pytest.fixture(scope="module")
def vllm_tiny_policy(tiny_policy_path):
    """One in-process vLLM engine for this module, shut down afterwards: an idle engine keeps
    polling and would take CPU from the (niced) Ray workers of later tests."""
    engine = {**vars(EngineConfig(dtype="float32", max_model_len=256, max_num_seqs=64))}
    env = engine_environment(engine)  # what the rollout actors start with
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    llm = LLM(**llm_kwargs(tiny_policy_path, engine, seed=0))  # what the rollout actors build
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_vllm_prompt_logprobs_match_transformers(tiny_policy_path, vllm_tiny_policy):
    tok = AutoTokenizer.from_pretrained(tiny_policy_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_path).eval()
    prompt = render_prompt(tok, "7+5*3-2")
    ids = tok(prompt + "Step 1: 7+5 = 2\n\nStep 2: 2*3 = 6", add_special_tokens=False)["input_ids"]
    out = vllm_tiny_policy.generate([{"prompt_token_ids": ids}],
                                    SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    plp = out[0].prompt_logprobs
    assert plp[0] is None  # vLLM convention: no log-prob for the first token
    vllm_lp = torch.tensor([plp[i][ids[i]].logprob for i in range(1, len(ids))])
    t = torch.tensor([ids])
    mask = torch.ones_like(t, dtype=torch.bool)
    mask[0, 0] = False
    with torch.no_grad():
        hf_lp = response_logprobs(model, t, torch.ones_like(t), mask)[0, 1:]
    assert torch.allclose(vllm_lp, hf_lp, atol=1e-4), (vllm_lp - hf_lp).abs().max()


def test_vllm_samples_n_responses_that_decode_with_our_tokenizer(tiny_policy_path, vllm_tiny_policy):
    tok = AutoTokenizer.from_pretrained(tiny_policy_path)
    ids = tok(render_prompt(tok, "3+4"), add_special_tokens=False)["input_ids"]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=20, seed=7)
    outs = vllm_tiny_policy.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs
    assert len(outs) == 4
    for o in outs:
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True)
    again = vllm_tiny_policy.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs
    assert [o.text for o in again] == [o.text for o in outs]  # seeded sampling is reproducible


def test_many_seeded_requests_with_long_prompts_do_not_crash_the_cpu_engine(vllm_tiny_policy):
    """A batch whose prompts overflow a scheduler step splits a prefill; with per-request seeds that
    crashed vLLM's CPU runner until chunked prefill was turned off for CPU engines (llm_kwargs).
    Step-label completions (prompt + prefix, all seeded) are such a batch."""
    reqs = [{"prompt_token_ids": [1] + [5 + (i * 7 + j) % 80 for j in range(200)]} for i in range(200)]
    params = [SamplingParams(n=1, temperature=1.0, max_tokens=4, seed=i) for i in range(200)]
    outs = vllm_tiny_policy.generate(reqs, params, use_tqdm=False)
    assert len(outs) == 200 and all(o.outputs[0].token_ids for o in outs)
    again = vllm_tiny_policy.generate(reqs[:5], params[:5], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs[:5]]
