"""The Ray Data scoring pass equals in-process ImplicitPRM.score; metrics come out of it."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prm_ray.config import ConfigError
from prm_ray.core.reward import AGGREGATIONS
from prm_ray.scoring import ImplicitPRM
from prm_ray.stages.evaluate import (
    EvaluateConfig,
    evaluate_prm,
    metrics,
    problems_from_scores,
    reaggregate,
    reference_logprobs,
)

RESPONSES = [
    "Step 1: 3+4 = 7\n\nStep 2: 7*2 = 4\n\nThe answer is \\boxed{4}",
    "Step 1: 3+4 = 7\n\nThe answer is \\boxed{7}",
    "no steps at all",
    "",
    "Step 1: 1+1 = 2\n\n\n\nStep 2: 2+2 = 4\n\nThe answer is \\boxed{4}",
    "Step 1: 9-9 = 0\n\nThe answer is \\boxed{0}",
]


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory):
    """3 problems x 4 samples, written like the rollout pipeline does (one Parquet shard each)."""
    out = tmp_path_factory.mktemp("eval_rollouts")
    (out / "data").mkdir()
    for p in range(3):
        rows = [{"instruction_id": f"p{p}", "prompt": f"Compute {p}+{p} then double it.",
                 "response": RESPONSES[(p + j) % len(RESPONSES)], "sample_index": j,
                 "correct": (p + j) % 2 == 0, "extracted_answer": str((p + j) % 3),
                 "answer_group": str((p + j) % 3)} for j in range(4)]
        pq.write_table(pa.Table.from_pylist(rows), out / "data" / f"shard-{p:06d}.parquet")
    return out


def _expected(prm_path, ref_path, table, beta, aggregation):
    prm = ImplicitPRM.from_pretrained(prm_path, ref_path=ref_path, beta=beta)
    return prm.score(table["prompt"], table["response"], aggregation=aggregation, batch_size=5)


@pytest.mark.parametrize("use_ref", [True, False])
def test_scores_match_in_process_scoring(rollouts, tiny_prm_path, tiny_policy_path, ray_session, tmp_path, use_ref):
    cfg = EvaluateConfig(use_reference=use_ref, batch_size=5, micro_batch_size=3, replicas=1, dtype="float32")
    data = rollouts
    if use_ref:
        info = reference_logprobs(rollouts, tiny_policy_path, tmp_path / "ref", cfg)
        assert info["rows"] == 12 and not info["reused"]
        assert reference_logprobs(rollouts, tiny_policy_path, tmp_path / "ref", cfg)["reused"]
        data = tmp_path / "ref"
    res = evaluate_prm(tiny_prm_path, data, tmp_path / "eval", cfg, beta=0.3)
    assert res["votes_by"] == "answer_group"
    assert res["problems"] == 3 and res["samples_per_problem"] == 4 and res["responses"] == 12
    got = pq.read_table(tmp_path / "eval" / "scores").to_pylist()
    src = pq.read_table(rollouts / "data").to_pydict()
    key = {(r["instruction_id"], r["sample_index"]): r for r in got}
    assert len(key) == 12
    for agg in AGGREGATIONS:
        want = _expected(tiny_prm_path, tiny_policy_path if use_ref else None, src, 0.3, agg)
        for i, w in enumerate(want):
            row = key[(src["instruction_id"][i], src["sample_index"][i])]
            assert row[f"score_{agg}"] == pytest.approx(w.score, abs=1e-5)
            assert row["step_rewards"] == pytest.approx(w.step_rewards, abs=1e-5)
            assert row["q_values"] == pytest.approx(w.q_values, abs=1e-5)
            assert row["num_tokens"] == w.num_tokens
    # Every aggregation again from the stored step rewards alone (the study's other aggregations).
    again = reaggregate(tmp_path / "eval" / "scores", list(AGGREGATIONS)).to_pylist()
    for a, b in zip(again, pq.read_table(tmp_path / "eval" / "scores").to_pylist()):
        assert {k: a[k] for k in a if k.startswith("score_")} == pytest.approx(
            {k: b[k] for k in b if k.startswith("score_")}, rel=1e-6, abs=1e-5)
    # Re-running with the same inputs reuses the result; another config recomputes it.
    assert evaluate_prm(tiny_prm_path, data, tmp_path / "eval", cfg, beta=0.3)["reused"]
    other = EvaluateConfig(use_reference=use_ref, batch_size=5, micro_batch_size=3, replicas=1, protocol="random",
                           dtype="float32")
    assert not evaluate_prm(tiny_prm_path, data, tmp_path / "eval", other, beta=0.3, overwrite=True)["reused"]
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    problems = problems_from_scores(tmp_path / "eval" / "scores")
    assert saved["metrics"]["bon@4"] == pytest.approx(_bon_by_hand(problems), abs=1e-12)
    assert saved["metrics"] == metrics(problems, other, beta=0.3)  # the vote coefficient sees beta


def _bon_by_hand(problems):
    total = 0.0
    for p in problems:
        best = max(p["scores"])
        tied = [c for c, s in zip(p["correct"], p["scores"]) if s == best]
        total += sum(tied) / len(tied)
    return total / len(problems)


def test_actor_pools_use_current_ray_data_apis_and_keep_logs_quiet(ray_session):
    """Every stage's actor pool goes through map_actors: no deprecated ``concurrency=`` (Ray Data
    warns on every pass), and in a redirected log one progress line a minute instead of a block
    every 10 s."""
    import logging

    import ray.data

    class Double:  # defined here: Ray pickles a local class by value
        def __call__(self, batch):
            return batch.set_column(0, "x", pa.array([2 * v for v in batch.column("x").to_pylist()]))

    from prm_ray.resources import Resources
    from prm_ray.stages.runtime import init_ray, map_actors

    init_ray()
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("ray.data._internal.util")
    logger.addHandler(handler)
    try:
        ds = map_actors(ray.data.from_items([{"x": i} for i in range(4)]), Double, Resources(num_cpus=0.5),
                        stage="test", constructor_kwargs={}, batch_size=2)
        assert sorted(r["x"] for r in ds.take_all()) == [0, 2, 4, 6]
    finally:
        logger.removeHandler(handler)
    assert not [m for m in seen if "deprecated" in m], seen
    # pytest's stdout is no terminal
    assert ray.data.DataContext.get_current().enable_operator_progress_bars is False
    assert os.environ["RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL"] == "60"


def test_scoring_without_cached_reference_is_refused(rollouts, tiny_prm_path, ray_session, tmp_path):
    with pytest.raises(ValueError, match="ref_token_logp"):
        evaluate_prm(tiny_prm_path, rollouts, tmp_path / "eval", EvaluateConfig(replicas=1))


def test_the_vote_coefficient_multiplies_the_raw_log_ratio_by_default():
    """The released eval weighs votes by sigmoid(0.001 x log-ratio), without the training beta;
    vote_on: score puts the coefficient on the beta-scaled score instead (20x flatter at beta 0.05)."""
    p = [{"instruction_id": "p", "correct": [True, False, False], "answers": ["a", "b", "b"],
          "scores": [50.0, -50.0, -50.0]}]  # beta 0.05: log-ratios +-1000
    assert metrics(p, EvaluateConfig(ns=[3]), beta=0.05)["weighted_mv@3"] == 1.0  # sigmoid(1) > 2 sigmoid(-1)
    assert metrics(p, EvaluateConfig(ns=[3], vote_on="score"), beta=0.05)["weighted_mv@3"] == 0.0
    assert metrics(p, EvaluateConfig(ns=[3], vote_coef=0.02), beta=1.0)["weighted_mv@3"] == 1.0


def test_bad_eval_config_names_the_field():
    with pytest.raises(ConfigError, match="eval.aggregation"):
        EvaluateConfig(aggregation="max")
    with pytest.raises(ConfigError, match="eval.protocol"):
        EvaluateConfig(protocol="last")
    with pytest.raises(ConfigError, match="eval.vote_on"):
        EvaluateConfig(vote_on="beta")
    with pytest.raises(ConfigError, match="eval.ties"):
        EvaluateConfig(ties="last")
    with pytest.raises(ConfigError, match="eval.vote_coef"):
        EvaluateConfig(vote_coef=0)
    with pytest.raises(ConfigError, match="eval.micro_batch_size"):
        EvaluateConfig(micro_batch_size=0)


def test_the_vllm_backend_gives_the_hf_passs_numbers(rollouts, tiny_prm_path, tiny_policy_path, ray_session, tmp_path):
    """Implicit-PRM scores from vLLM's prompt_logprobs against the HF pass (fp32), on the same
    cached reference log-probs: one vLLM engine (its start-up is most of this test)."""
    hf = EvaluateConfig(replicas=1, dtype="float32", batch_size=8, micro_batch_size=4)
    vllm = EvaluateConfig(replicas=1, dtype="float32", batch_size=8, micro_batch_size=4, backend="vllm")
    reference_logprobs(rollouts, tiny_policy_path, tmp_path / "ref", hf)
    scores = {}
    for name, cfg in (("hf", hf), ("vllm", vllm)):
        evaluate_prm(tiny_prm_path, tmp_path / "ref", tmp_path / f"eval-{name}", cfg, beta=0.3)
        scores[name] = {(r["instruction_id"], r["sample_index"]): r
                        for r in pq.read_table(tmp_path / f"eval-{name}" / "scores").to_pylist()}
    assert scores["hf"].keys() == scores["vllm"].keys() and len(scores["hf"]) == 12
    for k, want in scores["hf"].items():
        assert scores["vllm"][k]["step_rewards"] == pytest.approx(want["step_rewards"], abs=1e-4)
        assert scores["vllm"][k]["score_min"] == pytest.approx(want["score_min"], abs=1e-4)
    with pytest.raises(ConfigError, match="backend"):
        EvaluateConfig(backend="trt")


def test_the_release_preset_pins_the_released_eval_s_settings():
    cfg = EvaluateConfig(preset="release")
    assert (cfg.step_split, cfg.aggregation, cfg.vote_coef, cfg.vote_on, cfg.ties, cfg.protocol) == (
        "release", "min", 0.001, "log_ratio", "first", "first")
    assert EvaluateConfig(preset="release", ns=[4], replicas=1).ns == [4]  # other fields stay free
    with pytest.raises(ConfigError, match="eval.aggregation is 'sum' but eval.preset release"):
        EvaluateConfig(preset="release", aggregation="sum")
    with pytest.raises(ConfigError, match="eval.preset"):
        EvaluateConfig(preset="paper")
    from prm_ray.config import from_dict, to_dict

    assert from_dict(EvaluateConfig, to_dict(cfg)) == cfg  # a saved config loads back


def test_release_steps_score_as_in_process(rollouts, tiny_prm_path, tiny_policy_path, ray_session, tmp_path):
    """The reference pass and the PRM pass both tokenize the rewritten texts."""
    cfg = EvaluateConfig(preset="release", batch_size=6, micro_batch_size=4, replicas=1, dtype="float32")
    ref = reference_logprobs(rollouts, tiny_policy_path, tmp_path / "ref", cfg.pass_config(), step_split="release")
    assert ref["key"]["step_split"] == "release"
    res = evaluate_prm(tiny_prm_path, tmp_path / "ref", tmp_path / "eval", cfg, beta=0.3)
    src = pq.read_table(rollouts / "data").to_pydict()
    prm = ImplicitPRM.from_pretrained(tiny_prm_path, ref_path=tiny_policy_path, beta=0.3, step_split="release")
    want = prm.score(src["prompt"], src["response"], aggregation="min")
    got = {(r["instruction_id"], r["sample_index"]): r for r in pq.read_table(tmp_path / "eval" / "scores").to_pylist()}
    for i, w in enumerate(want):
        row = got[(src["instruction_id"][i], src["sample_index"][i])]
        assert row["step_rewards"] == pytest.approx(w.step_rewards, abs=1e-5)
        assert len(w.step_rewards) == max(1, RESPONSES[(i // 4 + i % 4) % len(RESPONSES)].count("Step "))
    assert res["metrics"]["pass@1_first"] == sum(src["correct"][i] for i in range(0, 12, 4)) / 3
