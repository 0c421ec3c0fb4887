"""Dress rehearsal of the real-model path, on a stand-in instruct model (prm_ray/policy/standin.py):
a byte-level BPE tokenizer, a Llama-3 chat template with its own end-of-turn token, MATH problems.

Every stage runs for real and feeds the next, as a user chains the jobs: rollouts (vLLM, the MATH
instruction in the user turn) -> verification (math-verify, answer groups) -> CE and DPO PRMs ->
the reference pass and evaluation with grouped votes -> Math-Shepherd labels -> the Serve
endpoint. It checks the wiring, not the quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from prm_ray.artifacts import load_rollouts
from prm_ray.policy.standin import EOT, GENERATION_PROMPT, build_standin
from prm_ray.resources import Resources
from prm_ray.scoring import ImplicitPRM
from prm_ray.stages.evaluate import EvaluateConfig, EvaluationJobConfig, reference_logprobs, run_evaluation
from prm_ray.stages.logprobs import LogprobPassConfig
from prm_ray.stages.rollout import RolloutConfig, SamplingConfig, run_rollouts
from prm_ray.stages.shepherd import ShepherdConfig, run_shepherd
from prm_ray.stages.train import TrainConfig, train_prm
from prm_ray.tasks.math import DEFAULT_PROMPT_SUFFIX
from prm_ray.tokens import encode_pair

BETA = 0.5


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    out = tmp_path_factory.mktemp("standin")
    info = build_standin(out)
    return str(out), info


@pytest.fixture(scope="module")
def tok(standin):
    return AutoTokenizer.from_pretrained(standin[0])


@pytest.fixture(scope="module")
def rollouts(standin, ray_session, tmp_path_factory):
    path, _ = standin
    out = tmp_path_factory.mktemp("real_path") / "rollouts"
    cfg = RolloutConfig(model=path, out=str(out), task="math", instructions=str(Path(path) / "problems.jsonl"),
                        split="test", shard_size=3, sampling=SamplingConfig(n=8, temperature=1.0, max_tokens=40),
                        progress=False)
    return out, run_rollouts(cfg)


def test_the_stand_in_looks_like_an_instruct_model(standin, tok):
    path, info = standin
    assert 3000 < len(tok) <= 256 + 6 + 3000  # bytes + merges + Llama 3's special tokens
    assert tok.eos_token == EOT and tok.bos_token == "<|begin_of_text|>" and tok.eos_token_id != tok.pad_token_id
    rendered = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith(GENERATION_PROMPT)
    assert json.loads((Path(path) / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_rollouts_send_the_instruction_in_the_chat_template_and_verify(rollouts, standin, tok):
    out, summary = rollouts
    table = load_rollouts(out)
    rows = table.to_pylist()
    problems = {p["unique_id"]: p for p in standin[1]["problems"]}
    assert len(rows) == 8 * len(problems)
    for r in rows:
        assert r["prompt"] == problems[r["instruction_id"]]["problem"] + DEFAULT_PROMPT_SUFFIX
    # Both labels, and every status accounted for.
    correct = [r["correct"] for r in rows]
    assert 0 < sum(correct) < len(rows), summary["verify_status"]
    assert sum(summary["verify_status"].values()) == len(rows)
    # Answer groups: every correct answer votes as its gold, spelled "42" or "42.0".
    for r in rows:
        if r["correct"]:
            assert r["answer_group"] == r["gold_answer"], r
        elif r["extracted_answer"] is None:
            assert r["answer_group"] is None
    assert any(r["correct"] and r["extracted_answer"] != r["gold_answer"] for r in rows), \
        "no equivalently-spelled right answer was sampled"
    assert summary["this_run"]["answer_group_timeouts"] == 0


def test_bpe_tokens_and_steps_line_up_and_the_eot_closes_the_last_step(rollouts, tok):
    out, _ = rollouts
    gen_prompt = tok(GENERATION_PROMPT, add_special_tokens=False)["input_ids"]
    for r in load_rollouts(out).to_pylist():
        item = encode_pair(tok, r["prompt"], r["response"])
        p = item.prompt_len
        # The generation prompt ends the prompt: its tokens are never response tokens (no reward).
        assert item.input_ids[p - len(gen_prompt):p] == gen_prompt
        assert item.input_ids[-1] == tok.eos_token_id and item.step_ids[-1] == len(item.steps) - 1
        assert "".join(item.steps) == r["response"]
        # Each response token is exactly the text its offsets name, and its step is the step
        # holding its last character.
        enc = tok(r["response"], add_special_tokens=False, return_offsets_mapping=True)
        assert enc["input_ids"] == item.input_ids[p:-1]
        bounds = [0]
        for s in item.steps:
            bounds.append(bounds[-1] + len(s))
        for tid, (a, b), step in zip(enc["input_ids"], enc["offset_mapping"], item.step_ids):
            piece = tok.decode([tid])
            if "\ufffd" not in piece:  # a byte-level token inside a multi-byte character
                assert r["response"][a:b] == piece
            assert bounds[step] <= b - 1 < bounds[step + 1]


EVAL = EvaluateConfig(replicas=1, batch_size=16, micro_batch_size=8, dtype="float32")


@pytest.fixture(scope="module")
def eval_out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def prms(rollouts, standin, eval_out, tmp_path_factory):
    # The reference log-probs where jobs/evaluate_prm.py keeps them: CE training reads them as its
    # cache (as a study does), and the evaluation below reuses them.
    ref = reference_logprobs(rollouts[0], standin[0], eval_out / "ref-logprobs", EVAL.pass_config())
    assert not ref["reused"]
    out = {}
    for objective, reference in (("ce", True), ("dpo", False)):  # DPO "w/o ref" saves a reference pass
        cfg = TrainConfig(data=str(rollouts[0]), model=standin[0], out=str(tmp_path_factory.mktemp(f"prm_{objective}")),
                          beta=BETA, lr=1e-3, epochs=1, global_batch_size=8, micro_batch_size=4, warmup_ratio=0.0,
                          workers=Resources(replicas=1, num_cpus=0.5), checkpoint_every=1000, use_reference=reference,
                          ref_cache=str(eval_out / "ref-logprobs") if reference else None,
                          ref_pass=LogprobPassConfig(replicas=1, dtype="float32"))
        cfg.dataset.objective = objective
        cfg.dataset.__post_init__()
        out[objective] = (cfg.out, train_prm(cfg))
    return out


def test_ce_and_dpo_train_on_the_bpe_rollouts(prms):
    for objective, (path, report) in prms.items():
        assert report["status"] == "finished" and report["steps"] >= 1, (objective, report)
        assert report["examples"] > 0
        card = json.loads((Path(path) / "prm_ray_prm.json").read_text())
        assert card["objective"] == objective and card["beta"] == BETA
        assert (Path(path) / "tokenizer.json").exists()  # the PRM ships the BPE tokenizer


@pytest.fixture(scope="module")
def evaluation(prms, rollouts, eval_out):
    cfg = EvaluationJobConfig(prm=prms["ce"][0], data=str(rollouts[0]), out=str(eval_out), eval=EVAL)
    return cfg, run_evaluation(cfg)


def test_evaluation_scores_as_in_process_and_votes_by_answer_group(evaluation, rollouts, standin):
    cfg, result = evaluation
    assert result["votes_by"] == "answer_group" and result["reference"]["rows"] == result["responses"]
    assert result["reference"]["reused"]  # made before training, read by CE training and by this
    m = result["metrics"]
    assert result["samples_per_problem"] == 8 and {"pass@1", "pass@1_first", "bon@8", "weighted_mv@8",
                                                   "majority@8"} <= set(m)
    scores = pq.read_table(Path(cfg.out) / "eval" / "scores").to_pylist()
    assert all(s["answer_group"] is not None or s["extracted_answer"] is None for s in scores)
    prm = ImplicitPRM.from_pretrained(cfg.prm, ref_path=standin[0], beta=BETA)
    rows = load_rollouts(rollouts[0]).to_pylist()[:6]
    want = prm.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    got = {(s["instruction_id"], s["sample_index"]): s for s in scores}
    for r, w in zip(rows, want):
        s = got[(r["instruction_id"], r["sample_index"])]
        assert s["step_rewards"] == pytest.approx(w.step_rewards, abs=1e-5)
        assert s["num_tokens"] == w.num_tokens  # the response's tokens and its EOT
    assert (Path(cfg.out) / "config.yaml").exists() and (Path(cfg.out) / "eval" / "eval_config.yaml").exists()


def test_math_shepherd_labels_the_bpe_steps(rollouts, standin, tok, tmp_path):
    cfg = ShepherdConfig(rollouts=str(rollouts[0]), out=str(tmp_path / "labels"), completions_per_step=2,
                         responses_per_instruction=2, shard_size=4, progress=False)
    summary = run_shepherd(cfg)
    labels = pq.read_table(tmp_path / "labels" / "data").to_pylist()
    assert labels and summary["complete"]
    assert summary["timing"]["this_run"]["completions"] == sum(sum(r["step_completions"][:-1]) for r in labels)
    for r in labels:
        steps = encode_pair(tok, r["prompt"], r["response"]).steps
        assert r["steps"] == steps
        assert len(r["step_labels_hard"]) == len(r["step_labels_soft"]) == len(steps)
        assert r["step_correct"][-1] == int(r["correct"])
        assert r["completion_prompt_tokens"] > 0 or len(steps) == 1


def test_the_serve_endpoint_scores_the_bpe_prm(prms, rollouts, standin, serve_instance):
    import httpx
    from ray import serve

    from prm_ray.serve import ServeConfig, build_app

    cfg = ServeConfig(prm=prms["dpo"][0], reference_model=standin[0], name="prm-real-path", num_cpus=0.5,
                      dtype="float32", max_batch_size=8, vote_groups="math")
    serve.run(build_app(cfg), name=cfg.name, route_prefix="/real")
    try:
        r = load_rollouts(rollouts[0]).to_pylist()[0]
        with httpx.Client(base_url=serve_instance, timeout=60) as c:
            got = c.post("/real/score", json={"prompt": r["prompt"], "response": r["response"]}).json()
        want = ImplicitPRM.from_pretrained(prms["dpo"][0], ref_path=standin[0], beta=BETA).score(
            [r["prompt"]], [r["response"]])[0]
        assert got["steps"] == want.steps and got["num_tokens"] == want.num_tokens
        assert got["score"] == pytest.approx(want.score, abs=1e-5)
        # vote_groups math: 0.5 and \frac12 are one answer in /rerank's vote, which outweighs 3.
        spelled = [f"Step 1: Halve it.\n\nStep 2: The answer is \\boxed{{{a}}}." for a in ("3", "0.5", "\\frac12")]
        with httpx.Client(base_url=serve_instance, timeout=60) as c:
            vote = c.post("/real/rerank", json={"prompt": r["prompt"], "responses": spelled}).json()["vote"]
        assert vote["answer"] == "0.5" and set(vote["weights"]) == {"3", "0.5"}, vote
    finally:
        serve.delete(cfg.name)


def test_the_release_protocol_on_bpe_steps(prms, rollouts, standin, tok, tmp_path):
    """--eval.preset release on the stand-in's "Step N:" responses: the rewritten texts' BPE tokens
    score as in process, each step ending with its blank line and the last with <|eot_id|>."""
    cfg = EvaluationJobConfig(prm=prms["dpo"][0], data=str(rollouts[0]), out=str(tmp_path),
                              eval=EvaluateConfig(preset="release", use_reference=False, replicas=1, batch_size=16,
                                                  micro_batch_size=8, dtype="float32"))
    result = run_evaluation(cfg)
    assert result["reference"] is None and {"pass@1_first", "bon@8"} <= set(result["metrics"])
    rows = load_rollouts(rollouts[0]).to_pylist()[:6]
    prm = ImplicitPRM.from_pretrained(prms["dpo"][0], beta=BETA, step_split="release")
    want = prm.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    got = {(s["instruction_id"], s["sample_index"]): s for s in pq.read_table(tmp_path / "eval" / "scores").to_pylist()}
    for r, w in zip(rows, want):
        assert got[(r["instruction_id"], r["sample_index"])]["step_rewards"] == pytest.approx(w.step_rewards, abs=1e-5)
        item = encode_pair(tok, r["prompt"], r["response"], step_split="release")
        assert all(s.startswith(f"Step {k + 1}: ") for k, s in enumerate(item.steps)) or not r["response"].strip()
        assert all(s.endswith("\n\n") for s in item.steps[:-1]) and item.input_ids[-1] == tok.eos_token_id
