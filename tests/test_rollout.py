"""Rollouts end to end through a local Ray: vLLM actor pool -> verifier actors -> Parquet shards."""

import json
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY_ARITH

from prm_ray.config import ConfigError
from prm_ray.stages.rollout import SCHEMA, RolloutConfig, SamplingConfig, VerifierConfig, run_rollouts
from prm_ray.tasks.arith import ArithConfig, ArithTask
from prm_ray.tasks.math import DEFAULT_PROMPT_SUFFIX


def _cfg(policy_dir, out, **kw):
    base = dict(model=policy_dir, out=str(out), task="arith", split="validation", limit=6, shard_size=2,
                sampling=SamplingConfig(n=4, max_tokens=48), arith=ArithConfig(**TINY_ARITH), progress=False)
    base.update(kw)
    return RolloutConfig(**base)


def _read(out) -> pa.Table:
    return pq.read_table(Path(out) / "data")


@pytest.fixture(scope="module")
def clean_run(tiny_rollouts, tiny_trained_policy):
    out, summary = tiny_rollouts  # made with _cfg's settings (conftest)
    assert summary["this_run"]["shards_done"] == 3
    return out, summary


def test_exactly_n_rows_per_instruction_with_the_documented_schema(clean_run):
    out, summary = clean_run
    table = _read(out)
    assert table.schema.remove_metadata().equals(SCHEMA)
    rows = table.to_pylist()
    per_inst = Counter(r["instruction_id"] for r in rows)
    assert len(per_inst) == 6 and set(per_inst.values()) == {4}
    for iid in per_inst:
        assert sorted(r["sample_index"] for r in rows if r["instruction_id"] == iid) == [0, 1, 2, 3]
    assert len({r["seed"] for r in rows}) == len(rows)  # every sample has its own seed
    assert all(r["num_tokens"] >= 1 and r["finish_reason"] in ("stop", "length") for r in rows)


def test_labels_agree_with_the_task_verifier_run_directly(clean_run):
    out, _ = clean_run
    task = ArithTask(ArithConfig(**TINY_ARITH))
    for r in _read(out).to_pylist():
        v = task.verify(r["response"], r["gold_answer"])
        assert (v.correct, v.status.value, v.extracted_answer) == (r["correct"], r["verify_status"],
                                                                   r["extracted_answer"])


def test_summary_matches_a_recount_from_parquet(clean_run):
    out, summary = clean_run
    rows = _read(out).to_pylist()
    by_inst: dict = {}
    for r in rows:
        by_inst.setdefault(r["instruction_id"], []).append(r["correct"])
    assert summary["responses"] == len(rows) == 24
    assert summary["pass@1"] == pytest.approx(sum(sum(v) / len(v) for v in by_inst.values()) / 6)
    assert summary["pass@N"] == pytest.approx(sum(any(v) for v in by_inst.values()) / 6)
    assert summary["verify_status"] == dict(Counter(r["verify_status"] for r in rows))
    assert summary["generated_tokens_total"] == sum(r["num_tokens"] for r in rows)
    assert summary["this_run"]["shards_done"] == 3 and summary["this_run"]["generated_tokens_per_s"] > 0
    saved = json.loads((out / "summary.json").read_text())
    assert saved["pass@1"] == summary["pass@1"]
    meta = json.loads((out / "rollout_meta.json").read_text())
    assert meta["temperature"] == 0.8  # taken from the policy card
    assert (out / "config.yaml").exists()


def test_resume_after_interruption_equals_a_clean_run(clean_run, tiny_trained_policy, tmp_path):
    out, _ = clean_run
    resumed = tmp_path / "resumed"
    # An interrupted run: one shard finished, one died mid-write (a hidden temp file), one never ran.
    (resumed / "data").mkdir(parents=True)
    for name in ("shard-000001.parquet",):
        (resumed / "data" / name).write_bytes((out / "data" / name).read_bytes())
    (resumed / "data" / ".shard-000002.parquet.tmp-123").write_bytes(b"partial")
    cfg = _cfg(tiny_trained_policy[0].out, resumed)
    summary = run_rollouts(cfg)
    assert summary["this_run"]["shards_done"] == 2 and summary["this_run"]["shards_reused"] == 1

    def keyed(t):
        return {(r["instruction_id"], r["sample_index"]): r["response"] for r in t.to_pylist()}

    a, b = keyed(_read(out)), keyed(_read(resumed))
    assert _read(resumed).num_rows == len(b) == 24  # no duplicates
    assert a.keys() == b.keys()
    assert a == b  # per-sample seeds make the resumed samples identical too
    again = run_rollouts(cfg)  # a finished run does no work
    assert again["this_run"]["shards_done"] == 0


def test_changed_settings_into_the_same_output_are_refused(clean_run, tiny_trained_policy):
    out, _ = clean_run
    with pytest.raises(ConfigError, match="sampling"):
        run_rollouts(_cfg(tiny_trained_policy[0].out, out, sampling=SamplingConfig(n=2, max_tokens=48)))


def test_resuming_in_another_precision_is_refused(clean_run, tiny_trained_policy, tmp_path):
    """bf16 and fp32 engines sample different responses from the same seeds: a set resumed where
    `auto` resolves otherwise would mix two policies' samples."""
    import shutil

    out, _ = clean_run
    made = json.loads((out / "runs.jsonl").read_text().splitlines()[0])["engine_dtypes"]
    assert made in (["float32"], ["bfloat16"])
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    (resumed / "data" / "shard-000002.parquet").unlink()
    other = "float32" if made == ["bfloat16"] else "bfloat16"
    cfg = _cfg(tiny_trained_policy[0].out, resumed)
    cfg.engine.dtype = other
    with pytest.raises(ConfigError, match=f"sampled in {made[0]}.*engine.dtype: {made[0]}"):
        run_rollouts(cfg)


class ScriptedSampler:
    """Stands in for the vLLM stage: fixed responses, same interface, real downstream stages."""

    RESPONSES = ["Step 1: 4+5 = 9\n\nThe answer is \\boxed{9}", "\\boxed{9^{9^{9^{9}}}}", "I give up."]

    def __init__(self, model, engine, sampling, temperature):
        self.model = model

    def __call__(self, batch):
        shard = batch.to_pylist()[0]
        n = len(self.RESPONSES)
        iids = [i for i in shard["instruction_id"] for _ in range(n)]
        shard.update(sample_instruction_id=iids, sample_index=list(range(n)) * len(shard["instruction_id"]),
                     seed=list(range(len(iids))), model=self.model, generate_seconds=0.1,
                     engine_startup_seconds=0.0, response=self.RESPONSES * len(shard["instruction_id"]),
                     num_tokens=[5] * len(iids), cumulative_logprob=[-1.0] * len(iids),
                     finish_reason=["stop"] * len(iids))
        return pa.Table.from_pylist([shard])


@pytest.fixture(scope="module")
def math_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("math") / "problems.jsonl"
    rows = [{"problem": "What is 4+5?", "answer": "9", "unique_id": "a"},
            {"problem": "", "answer": "1", "unique_id": "empty"},
            {"problem": "What is 3*3?", "unique_id": "no-answer"},
            {"problem": "What is 10-1?", "answer": "9", "unique_id": "b"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_verifier_timeout_is_recorded_and_bad_rows_are_counted(ray_session, math_file, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = RolloutConfig(model="scripted", out=str(tmp_path / "m"), task="math", instructions=str(math_file),
                        shard_size=1, verifier=VerifierConfig(timeout_s=1.0),
                        sampling=SamplingConfig(n=3, temperature=1.0), progress=False)
    summary = run_rollouts(cfg, sampler_cls=ScriptedSampler)
    assert summary["skipped_instruction_rows"] == 2
    skipped = json.loads((tmp_path / "m" / "skipped_rows.json").read_text())
    assert any("problem" in reason for _, reason in skipped) and any("answer" in r for _, r in skipped)
    rows = _read(tmp_path / "m").to_pylist()
    assert len(rows) == 6
    assert Counter(r["verify_status"] for r in rows) == {"ok": 2, "timeout": 2, "no_answer": 2}
    assert all(r["correct"] == (r["sample_index"] == 0) for r in rows)
    assert summary["verify_status"]["timeout"] == 2
    # The prompt column is the user turn the policy was sent: the problem and the task's instruction.
    assert {r["prompt"] for r in rows} == {"What is 4+5?" + DEFAULT_PROMPT_SUFFIX, "What is 10-1?" + DEFAULT_PROMPT_SUFFIX}


def test_the_math_instruction_is_configurable_and_part_of_the_settings(ray_session, math_file, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = RolloutConfig(model="scripted", out=str(tmp_path / "m"), task="math", instructions=str(math_file),
                        prompt_suffix="\nBox it.", sampling=SamplingConfig(n=3, temperature=1.0), progress=False)
    run_rollouts(cfg, sampler_cls=ScriptedSampler)
    assert {r["prompt"] for r in _read(tmp_path / "m").to_pylist()} == {"What is 4+5?\nBox it.", "What is 10-1?\nBox it."}
    with pytest.raises(ConfigError, match="prompt_suffix"):
        run_rollouts(RolloutConfig(**{**vars(cfg), "prompt_suffix": None}), sampler_cls=ScriptedSampler)
    with pytest.raises(ConfigError, match="prompt_suffix applies to task math"):
        RolloutConfig(task="arith", prompt_suffix="x")


class SpellingSampler(ScriptedSampler):
    """Three right answers spelled three ways, and one wrong answer spelled the same way twice."""

    RESPONSES = ["\\boxed{0.5}", "\\boxed{\\dfrac{1}{2}}", "\\boxed{\\frac12}", "\\boxed{3}", "\\boxed{3}"]


def test_equivalent_spellings_win_the_majority_that_raw_strings_lose(ray_session, tmp_path):
    import ray.cloudpickle

    from prm_ray.core.metrics import evaluate_problems
    from prm_ray.stages.evaluate import EvaluateConfig, metrics, problems_from_scores

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    problems = tmp_path / "half.jsonl"
    problems.write_text(json.dumps({"problem": "Half of one?", "answer": "\\frac{1}{2}", "unique_id": "h"}) + "\n")
    cfg = RolloutConfig(model="scripted", out=str(tmp_path / "m"), task="math", instructions=str(problems),
                        sampling=SamplingConfig(n=5, temperature=1.0), progress=False)
    run_rollouts(cfg, sampler_cls=SpellingSampler)
    table = _read(tmp_path / "m")
    assert table.column("correct").to_pylist() == [True, True, True, False, False]
    table = table.append_column("score_min", pa.array([0.0] * 5, pa.float64()))
    grouped = metrics(problems_from_scores(table), EvaluateConfig(ns=[5]))
    raw = evaluate_problems(problems_from_scores(table, votes="extracted_answer"), [5])
    assert grouped["majority@5"] == 1.0 and grouped["weighted_mv@5"] == 1.0
    assert raw["majority@5"] == 0.0  # "3" has two raw votes, each right spelling one


def test_bad_rows_can_be_fatal_with_a_message_naming_them(math_file, tmp_path):
    cfg = RolloutConfig(model="scripted", out=str(tmp_path / "m"), task="math", instructions=str(math_file),
                        on_bad_row="error", progress=False)
    with pytest.raises(ValueError, match="line 2.*problem"):
        run_rollouts(cfg, sampler_cls=ScriptedSampler)


def test_bad_config_values_name_the_field():
    with pytest.raises(ConfigError, match="task"):
        RolloutConfig(task="chess")
    with pytest.raises(ConfigError, match="sampling.n"):
        RolloutConfig(sampling=SamplingConfig(n=0))
    with pytest.raises(ConfigError, match="shard_size"):
        RolloutConfig(shard_size=0)


def test_responses_leave_room_for_eos_within_the_model_context(tiny_trained_policy, ray_session, tmp_path):
    """max_tokens above the context is capped per request, so every response plus EOS still fits."""
    from transformers import AutoTokenizer

    from prm_ray.stages.rollout import EngineConfig
    from prm_ray.tokens import render_prompt

    policy = tiny_trained_policy[0].out
    out = tmp_path / "long"
    context = 40  # shorter than the tiny policy's answers (about 40 characters), so the cap binds
    run_rollouts(_cfg(policy, out, limit=2, sampling=SamplingConfig(n=2, max_tokens=10_000),
                      engine=EngineConfig(max_model_len=context)))
    tok = AutoTokenizer.from_pretrained(policy)
    rows = _read(out).to_pylist()
    assert len(rows) == 4
    for r in rows:
        prompt_len = len(tok(render_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"])
        assert prompt_len + r["num_tokens"] + 1 <= context, r
    assert any(r["finish_reason"] == "length" for r in rows)
