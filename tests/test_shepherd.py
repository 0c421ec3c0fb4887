"""Math-Shepherd step labels: scripted completions with known labels through the real verify/label/
write stages, and the real vLLM engine on the tiny trained policy."""

import json
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY_ARITH

from prm_ray.config import ConfigError, from_dict, to_dict
from prm_ray.stages.rollout import SCHEMA, RolloutConfig, SamplingConfig, sample_seed
from prm_ray.stages.shepherd import (
    LABEL_SCHEMA,
    ShepherdConfig,
    ShepherdSampler,
    ShepherdSamplingConfig,
    run_shepherd,
)
from prm_ray.tasks.arith import ArithConfig, ArithTask
from prm_ray.tokens import encode_pair, render_prompt

K = 4


def _read(out) -> list[dict]:
    table = pq.read_table(Path(out) / "data")
    assert table.schema.remove_metadata().equals(LABEL_SCHEMA)
    return table.to_pylist()


def _keyed(rows) -> dict:
    return {(r["instruction_id"], r["sample_index"]): r for r in rows}


# --------------------------------------------------------------------------------------------
# Scripted completions through the real pipeline
# --------------------------------------------------------------------------------------------


def _gold(expr: str) -> int:
    """Left-to-right sum mod 10 (the arith world with ops '+')."""
    return sum(int(x) for x in expr.split("+")) % 10


def stub_completion(expr: str, prefix: str, j: int) -> str:
    """Known completions: a prefix whose steps are all right always reaches the answer; after a
    wrong step, completions 0-1 reach it, 2 gives a wrong answer and 3+ give none. A prefix that
    already holds a boxed answer ("so far") gets a continuation without one."""
    gold = _gold(expr)
    if "so far" in prefix:
        return " and nothing more."
    wrong = any((int(a) + int(b)) % 10 != int(c) for a, b, c in re.findall(r"(\d+)\+(\d+) = (\d+)", prefix))
    if not wrong or j < 2:
        return f"The answer is \\boxed{{{gold}}}"
    return f"The answer is \\boxed{{{(gold + 1) % 10}}}" if j == 2 else "I do not know."


class StubSampler(ShepherdSampler):
    """The real request building (prefixes, budgets, seeds) with scripted generation."""

    def __init__(self, model, engine, sampling, completions_per_step):
        from transformers import AutoTokenizer

        self.model_name, self.sampling, self.k = model, sampling, completions_per_step
        self.temperature = sampling["temperature"]
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.startup_s, self.dtype = 0.0, "stub"

    def _generate(self, requests):
        out = []
        for q in requests:
            text = self.tokenizer.decode(q["prompt_token_ids"], skip_special_tokens=True)
            expr = re.match(r"Q: (.*)\n", text).group(1)
            if not text.endswith("\n" + q["prefix"]):  # the request is prompt + prefix
                raise AssertionError(f"request does not end with the prefix: {text!r}")
            completion = stub_completion(expr, q["prefix"], q["index"])
            out.append((completion, len(completion) + 1))  # char tokenizer, + EOS
        return out


class FailingSampler(StubSampler):
    def __call__(self, batch):
        raise RuntimeError("scripted sampler failure")


class ExplodingSampler:
    def __init__(self, *args, **kwargs):
        raise AssertionError("a finished output must not start the sampler")


LONG = "Step 1: 1+2 = 3\n\n" + "So " * 100 + "\n\nThe answer is \\boxed{3}"
# (instruction id, prompt, gold, sample_index, response, verify_status, correct)
HAND_ROWS = [
    ("A", "4+5", "9", 0, "Step 1: 4+5 = 9\n\nThe answer is \\boxed{9}", "ok", True),
    ("A", "4+5", "9", 1, "Step 1: 4+5 = 8\n\nThe answer is \\boxed{8}", "ok", False),
    ("A", "4+5", "9", 2, "Step 1: 4+5 = 9\n\nThe answer is", "timeout", False),
    ("A", "4+5", "9", 3, "Step 1: 4+5 = 9, so far \\boxed{9}\n\nThe answer is \\boxed{9}", "ok", True),
    ("A", "4+5", "9", 4, "Step 1: 4+5 = 9\n\nThe answer is \\boxed{9}", "ok", True),  # beyond k=3
    ("B", "1+1+1+1", "4", 0, "Step 1: 1+1 = 2\n\nStep 2: 2+1 = 5\n\nStep 3: 5+1 = 6\n\nThe answer is \\boxed{6}",
     "ok", False),
    ("B", "1+1+1+1", "4", 1, "Step 1: 1+1 = 2\n\nI am not sure", "no_answer", False),
    ("B", "1+1+1+1", "4", 2, "The answer is \\boxed{4}", "ok", True),
    ("B", "1+1+1+1", "4", 3, "Step 1: 1+1 = 2\n\nThe answer is \\boxed{2}", "error", False),
    # A gold the verifier cannot parse: every completion is verify_status=error (unverifiable).
    ("C", "2+2", "1.5", 0, "Step 1: 2+2 = 4\n\nThe answer is \\boxed{4}", "ok", False),
    ("D", "1+2", "3", 0, LONG, "ok", True),  # longer than the tiny model's 256-token context
    ("D", "1+2", "3", 1, "Step 1: 1+2 = 3\n\n\n\nThe answer is \\boxed{3}\n\n", "ok", True),
]
# (iid, sample_index) -> step_correct; completions are K per boundary and 1 for the last step.
EXPECTED_CORRECT = {
    ("A", 0): [4, 1], ("A", 1): [2, 0], ("A", 3): [4, 1],
    ("B", 0): [4, 2, 2, 0], ("B", 1): [4, 0], ("B", 2): [1],
    ("C", 0): [0, 0], ("D", 1): [4, 1],
}


def _write_rollouts(path: Path, model: str) -> Path:
    rows = [{"instruction_id": iid, "prompt": p, "response": resp, "sample_index": si, "gold_answer": g,
             "extracted_answer": None, "correct": ok, "verify_status": st, "num_tokens": len(resp) + 1,
             "cumulative_logprob": -1.0, "finish_reason": "stop", "model": model, "seed": 7}
            for iid, p, g, si, resp, st, ok in HAND_ROWS]
    (path / "data").mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    pq.write_table(table.slice(0, 6), path / "data" / "shard-000000.parquet")
    pq.write_table(table.slice(6), path / "data" / "shard-000001.parquet")
    rcfg = RolloutConfig(model=model, out=str(path), task="arith", arith=ArithConfig(**TINY_ARITH),
                         sampling=SamplingConfig(n=5, max_tokens=64))
    (path / "rollout_meta.json").write_text(json.dumps({"config": to_dict(rcfg), "temperature": 0.7}))
    return path


def _stub_cfg(rollouts, out, **kw):
    base = dict(rollouts=str(rollouts), out=str(out), completions_per_step=K, responses_per_instruction=3,
                shard_size=3, progress=False)
    base.update(kw)
    return ShepherdConfig(**base)


@pytest.fixture(scope="module")
def hand_run(tiny_policy_path, ray_session, tmp_path_factory):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root = tmp_path_factory.mktemp("shepherd_hand")
    rollouts = _write_rollouts(root / "rollouts", tiny_policy_path)
    summary = run_shepherd(_stub_cfg(rollouts, root / "labels"), sampler_cls=StubSampler)
    return rollouts, root / "labels", summary


def test_known_labels_through_the_real_stages(hand_run, tiny_policy_path):
    from transformers import AutoTokenizer

    _, out, summary = hand_run
    tok = AutoTokenizer.from_pretrained(tiny_policy_path)
    rows = _keyed(_read(out))
    assert set(rows) == set(EXPECTED_CORRECT)
    src = {(r[0], r[3]): r for r in HAND_ROWS}
    for key, correct in EXPECTED_CORRECT.items():
        r = rows[key]
        iid, prompt, gold, _, response, status, ok = src[key]
        assert (r["response"], r["gold_answer"], r["verify_status"], r["correct"]) == (response, gold, status, ok)
        steps = encode_pair(tok, prompt, response).steps
        assert r["steps"] == steps and "".join(steps) == response
        n = len(steps)
        assert r["step_correct"] == correct, key
        assert r["step_completions"] == [K] * (n - 1) + [1]
        assert r["step_labels_hard"] == [float(c > 0) for c in correct]
        assert r["step_labels_soft"] == pytest.approx([c / m for c, m in zip(correct, r["step_completions"])])
        assert r["step_labels_hard"][-1] == float(ok)  # the last step is the response's correctness
        prompt_len = len(tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"])
        prefixes = ["".join(steps[: t + 1]) for t in range(n - 1)]
        assert r["completion_prompt_tokens"] == sum(K * (prompt_len + len(p)) for p in prefixes)
        assert r["completion_generated_tokens"] == sum(len(stub_completion(prompt, p, j)) + 1
                                                       for p in prefixes for j in range(K))
        assert r["completions_unverifiable"] == (K if iid == "C" else 0)
    assert rows[("B", 0)]["step_labels_soft"] == pytest.approx([1.0, 0.5, 0.5, 0.0])
    # "so far": the completion has no answer, the prefix does: prefix + completion is verified.
    assert rows[("A", 3)]["step_labels_hard"] == [1.0, 1.0]

    assert summary["rows_labelled"] == 8 and summary["rows_in_rollouts"] == len(HAND_ROWS)
    assert summary["rows_skipped"] == {"unverifiable_timeout": 1, "unverifiable_error": 1,
                                       "beyond_first_k": 1, "exceeds_context": 1}
    all_correct = [c for v in EXPECTED_CORRECT.values() for c in v]
    steps = len(all_correct)
    assert summary["steps"] == steps and summary["boundaries_sampled"] == steps - 8
    assert summary["completions"] == K * (steps - 8)
    assert summary["completions_unverifiable"] == K
    assert summary["positive_fraction_hard"] == pytest.approx(sum(c > 0 for c in all_correct) / steps)
    soft = [s for r in rows.values() for s in r["step_labels_soft"]]
    assert summary["mean_soft_label"] == pytest.approx(sum(soft) / steps)
    assert summary["completion_prompt_tokens"] == sum(r["completion_prompt_tokens"] for r in rows.values())
    assert summary["completion_generated_tokens"] == sum(r["completion_generated_tokens"] for r in rows.values())
    assert summary["temperature"] == 0.7 and summary["max_tokens"] == 64 and summary["context_length"] == 256
    assert summary["shards"] == {"total": 3, "done_this_run": 3, "reused_this_run": 0}
    assert summary["complete"] and not summary["reused"]
    assert json.loads((out / "summary.json").read_text())["rows_labelled"] == 8
    assert (out / "config.yaml").exists() and (out / "shepherd_meta.json").exists()


def test_requests_carry_budget_and_per_completion_seeds(tiny_policy_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy_path)
    steps = encode_pair(tok, "1+1+1+1", HAND_ROWS[5][4]).steps  # 4 steps of 17, 17, 17, 23 chars
    prompt_len = len(tok(render_prompt(tok, "1+1+1+1"), add_special_tokens=False)["input_ids"])  # 12
    budgets = {}
    for ctx in (100, 40):
        s = StubSampler(tiny_policy_path, {}, {"temperature": 1.0, "top_p": 1.0, "max_tokens": 30, "seed": 5,
                                               "context_length": ctx}, 2)
        reqs = s._requests({"instruction_id": ["B"], "sample_index": [0], "prompt": ["1+1+1+1"],
                            "steps": [steps]})
        assert [(q["step"], q["index"]) for q in reqs] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
        for q in reqs:
            prefix = "".join(steps[: q["step"] + 1])
            assert q["prefix"] == prefix and len(q["prompt_token_ids"]) == prompt_len + len(prefix)
            assert q["seed"] == sample_seed(5, f"B/0/{q['step']}", q["index"])
            # the rollout budget minus the prefix, capped by the context minus prompt, prefix and EOS
            assert q["max_tokens"] == max(1, min(30 - len(prefix), ctx - prompt_len - len(prefix) - 1))
        assert len({q["seed"] for q in reqs}) == len(reqs)
        budgets[ctx] = [q["max_tokens"] for q in reqs[::2]]
    assert budgets == {100: [13, 1, 1], 40: [10, 1, 1]}  # rollout budget binds at 100, context at 40


def test_finished_output_is_reused_and_runs_are_appended(hand_run):
    rollouts, out, first = hand_run
    again = run_shepherd(_stub_cfg(rollouts, out), sampler_cls=ExplodingSampler)
    assert again["reused"] and again["rows_labelled"] == first["rows_labelled"]
    assert again["shards"]["done_this_run"] == 0
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == again["timing"]["runs"] >= 2 and runs[-1]["reused"]
    assert again["timing"]["total"]["wall_seconds"] == pytest.approx(sum(r["wall_seconds"] for r in runs))
    assert again["timing"]["total"]["completions"] == first["completions"]


def test_resume_redoes_only_missing_shards(hand_run, tmp_path):
    rollouts, out, _ = hand_run
    resumed = tmp_path / "resumed"
    (resumed / "data").mkdir(parents=True)
    shutil.copy(out / "data" / "shard-000001.parquet", resumed / "data")
    (resumed / "data" / ".shard-000002.parquet.tmp-9").write_bytes(b"partial")
    with pytest.raises(Exception, match="scripted sampler failure"):
        run_shepherd(_stub_cfg(rollouts, resumed), sampler_cls=FailingSampler)
    failed = json.loads((resumed / "runs.jsonl").read_text())
    assert failed["failed"] == "RuntimeError: scripted sampler failure" and failed["wall_seconds"] > 0
    summary = run_shepherd(_stub_cfg(rollouts, resumed), sampler_cls=StubSampler)
    assert summary["shards"] == {"total": 3, "done_this_run": 2, "reused_this_run": 1}
    assert _keyed(_read(resumed)) == _keyed(_read(out))
    assert summary["timing"]["runs"] == 2  # the failed run's seconds are kept in the totals
    assert summary["timing"]["total"]["wall_seconds"] > summary["timing"]["this_run"]["wall_seconds"]


def test_changed_settings_or_rollouts_are_refused(hand_run, tmp_path):
    rollouts, out, _ = hand_run
    with pytest.raises(ConfigError, match="completions_per_step"):
        run_shepherd(_stub_cfg(rollouts, out, completions_per_step=2), sampler_cls=ExplodingSampler)
    with pytest.raises(ConfigError, match="sampling.temperature"):
        run_shepherd(_stub_cfg(rollouts, out, sampling=ShepherdSamplingConfig(temperature=1.0)),
                     sampler_cls=ExplodingSampler)
    other = tmp_path / "other"
    shutil.copytree(rollouts, other)
    pq.write_table(pq.read_table(other / "data" / "shard-000001.parquet").slice(1),
                   other / "data" / "shard-000001.parquet")
    with pytest.raises(ConfigError, match="rollouts"):
        run_shepherd(_stub_cfg(other, out), sampler_cls=ExplodingSampler)


def test_bad_config_values_name_the_field(tmp_path):
    for kw, field in [({"completions_per_step": 0}, "completions_per_step"),
                      ({"responses_per_instruction": 0}, "responses_per_instruction"),
                      ({"shard_size": 0}, "shard_size"), ({"rollouts": ""}, "rollouts"),
                      ({"sampling": ShepherdSamplingConfig(top_p=0.0)}, "sampling.top_p"),
                      ({"sampling": ShepherdSamplingConfig(temperature=-1.0)}, "sampling.temperature"),
                      ({"sampling": ShepherdSamplingConfig(max_tokens=0)}, "sampling.max_tokens")]:
        with pytest.raises(ConfigError, match=field):
            ShepherdConfig(**kw)
    with pytest.raises(ConfigError, match="completions_per_step"):
        from_dict(ShepherdConfig, {"completions_per_step": "many"})
    with pytest.raises(ConfigError, match="sampling.max_tokens"):
        from_dict(ShepherdConfig, {"sampling": {"max_tokens": 0}})
    with pytest.raises(ConfigError, match="rollouts"):
        run_shepherd(ShepherdConfig(rollouts=str(tmp_path), out=str(tmp_path / "o")))


def test_cli_loads_the_config(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs"))
    try:
        import label_steps
    finally:
        sys.path.pop(0)
    from prm_ray.cli import parse_args

    cfg = parse_args(ShepherdConfig, ["--rollouts", "r", "--k", "3", "--temperature", "0.5", "--max-tokens",
                                      "null", "--responses-per-instruction", "2"], aliases=label_steps.ALIASES)
    assert (cfg.completions_per_step, cfg.sampling.temperature, cfg.sampling.max_tokens,
            cfg.responses_per_instruction) == (3, 0.5, None, 2)


# --------------------------------------------------------------------------------------------
# The real vLLM engine on the tiny trained policy
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_rollouts(tiny_rollouts):
    return tiny_rollouts[0]  # 6 instructions x 4 (conftest); the labels take the first of each


def _real_cfg(rollouts, out, **kw):
    base = dict(rollouts=str(rollouts), out=str(out), completions_per_step=2, shard_size=2, progress=False,
                responses_per_instruction=1)
    base.update(kw)
    return ShepherdConfig(**base)


@pytest.fixture(scope="module")
def real_run(real_rollouts, tmp_path_factory):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root = tmp_path_factory.mktemp("shepherd_real")
    record_dir = root / "records"
    record_dir.mkdir()

    class RecordingSampler(ShepherdSampler):
        """The real engine; also writes every request and completion to `record_dir`."""

        def _requests(self, shard):
            reqs = super()._requests(shard)
            for q in reqs:
                q["iid"], q["sidx"] = shard["instruction_id"][q["row"]], shard["sample_index"][q["row"]]
            return reqs

        def _generate(self, requests):
            import os
            import uuid

            results = super()._generate(requests)
            with open(record_dir / f"{os.getpid()}-{uuid.uuid4().hex}.jsonl", "w") as fh:
                for q, (text, n) in zip(requests, results):
                    fh.write(json.dumps({**q, "text": text, "tokens": n}) + "\n")
            return results

    summary = run_shepherd(_real_cfg(real_rollouts, root / "clean"), sampler_cls=RecordingSampler)
    records = [json.loads(line) for f in record_dir.glob("*.jsonl") for line in f.read_text().splitlines()]
    return root / "clean", summary, records


def test_real_completions_continue_the_prefix_and_are_verified_with_it(real_run, real_rollouts,
                                                                       tiny_trained_policy):
    from transformers import AutoTokenizer

    out, summary, records = real_run
    tok = AutoTokenizer.from_pretrained(tiny_trained_policy[0].out)
    rollout_rows = [r for r in pq.read_table(real_rollouts / "data").to_pylist() if r["sample_index"] == 0]
    rows = _keyed(_read(out))
    assert summary["rows_labelled"] == len(rows) == len(rollout_rows) == 6
    assert summary["rows_skipped"]["beyond_first_k"] == 18 and sum(summary["rows_skipped"].values()) == 18
    task = ArithTask(ArithConfig(**TINY_ARITH))
    by_boundary = defaultdict(list)
    for q in records:
        by_boundary[(q["iid"], q["sidx"], q["step"])].append(q)
    assert len(records) == 2 * summary["boundaries_sampled"] == summary["completions"] > 0
    for (iid, sidx), r in rows.items():
        steps = r["steps"]
        assert steps == encode_pair(tok, r["prompt"], r["response"]).steps
        assert len(r["step_labels_hard"]) == len(steps) and r["step_completions"] == [2] * (len(steps) - 1) + [1]
        assert r["step_correct"][-1] == int(r["correct"])
        p_ids = tok(render_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"]
        gen = prompt_tokens = 0
        for t in range(len(steps) - 1):
            qs = by_boundary[(iid, sidx, t)]
            assert sorted(q["index"] for q in qs) == [0, 1]
            prefix = "".join(steps[: t + 1])
            x_ids = tok(prefix, add_special_tokens=False)["input_ids"]
            verdicts = []
            for q in qs:
                assert q["prefix"] == prefix and q["prompt_token_ids"] == p_ids + x_ids  # starts from the prefix
                assert q["seed"] == sample_seed(0, f"{iid}/{sidx}/{t}", q["index"])
                assert q["max_tokens"] == max(1, min(48 - len(x_ids), 128 - len(p_ids) - len(x_ids) - 1))
                assert 1 <= q["tokens"] <= q["max_tokens"]
                verdicts.append(task.verify(prefix + q["text"], r["gold_answer"]))
                gen += q["tokens"]
                prompt_tokens += len(q["prompt_token_ids"])
            assert r["step_correct"][t] == sum(v.correct for v in verdicts)
        assert (r["completion_generated_tokens"], r["completion_prompt_tokens"]) == (gen, prompt_tokens)
    assert summary["temperature"] == 0.8  # the rollouts' temperature (the policy card's)
    assert summary["timing"]["this_run"]["generate_seconds"] > 0


def test_real_resume_is_reproducible_and_reuse_starts_nothing(real_run, real_rollouts, tmp_path):
    out, first, _ = real_run
    resumed = tmp_path / "resumed"
    (resumed / "data").mkdir(parents=True)
    shutil.copy(out / "data" / "shard-000001.parquet", resumed / "data")
    summary = run_shepherd(_real_cfg(real_rollouts, resumed))  # the plain ShepherdSampler
    assert summary["shards"] == {"total": 3, "done_this_run": 2, "reused_this_run": 1}
    # Shards 0 and 2 were sampled again by a new engine: per-completion seeds give the same labels.
    assert _keyed(_read(resumed)) == _keyed(_read(out))
    again = run_shepherd(_real_cfg(real_rollouts, resumed), sampler_cls=ExplodingSampler)
    assert again["reused"] and again["timing"]["runs"] == 2


def test_real_changed_settings_are_refused(real_run, real_rollouts):
    out, _, _ = real_run
    with pytest.raises(ConfigError, match="completions_per_step"):
        run_shepherd(_real_cfg(real_rollouts, out, completions_per_step=3), sampler_cls=ExplodingSampler)
    with pytest.raises(ConfigError, match="sampling.seed"):
        run_shepherd(_real_cfg(real_rollouts, out, sampling=ShepherdSamplingConfig(seed=1)),
                     sampler_cls=ExplodingSampler)
