"""Golden numbers: the scores of 64 (prompt, response) pairs from the shipped policy, saved by the code
before the package was reorganised (tests/data/golden, commit 1a275c9), equal the current code's to
1e-6 for every aggregation, through every scoring path: ImplicitPRM (with and without a reference),
ExplicitPRM, the Ray Data evaluation pass and the Serve endpoint. float64 models, so the tolerance
tests the code, not the CPU's rounding."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prm_ray.core.reward import AGGREGATIONS as ALL_AGGREGATIONS
from prm_ray.scoring import ExplicitPRM, ImplicitPRM
from prm_ray.serve import ServeConfig, build_app
from prm_ray.stages.evaluate import EvaluateConfig, reference_logprobs, score
from prm_ray.stages.logprobs import ModelPass

GOLDEN = Path(__file__).parent / "data" / "golden"
POLICY = str(Path(__file__).resolve().parents[1] / "artifacts" / "policy")
TOL = 1e-6

# The aggregations the golden file (made at 1a275c9) holds; min_q and sum_q came later and are
# checked against hand-made values in tests/test_reward.py.
AGGREGATIONS = ("min", "sum", "last_q", "mean")
assert set(AGGREGATIONS) <= set(ALL_AGGREGATIONS)


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads((GOLDEN / "scores.json").read_text())


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    return [json.loads(line) for line in (GOLDEN / "pairs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """The golden reference: the shipped policy with its final RMSNorm weight halved (no randomness)."""
    out = tmp_path_factory.mktemp("golden_ref")
    model = AutoModelForCausalLM.from_pretrained(POLICY, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(0.5)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(POLICY).save_pretrained(out)
    return str(out)


def _same(got: dict, want: dict, score_key: str = "score") -> None:
    assert got["num_tokens"] == want["num_tokens"]
    assert got["step_rewards"] == pytest.approx(want["step_rewards"], abs=TOL, rel=0)
    assert got["q_values"] == pytest.approx(want["q_values"], abs=TOL, rel=0)
    assert got[score_key] == pytest.approx(want[score_key], abs=TOL, rel=0)


def test_in_process_scores_are_the_golden_ones(golden, pairs, reference):
    prompts, responses = [p["prompt"] for p in pairs], [p["response"] for p in pairs]
    prms = {"implicit": ImplicitPRM.from_pretrained(POLICY, ref_path=reference, beta=golden["beta"], dtype="float64"),
            "implicit_noref": ImplicitPRM.from_pretrained(POLICY, beta=golden["beta"], dtype="float64"),
            "explicit": ExplicitPRM.from_pretrained(POLICY, dtype="float64")}
    for name, prm in prms.items():
        got = prm.score(prompts, responses, aggregation="mean", batch_size=16)  # every aggregation comes along
        assert all(g.aggregation == "mean" and g.score == g.scores["mean"] for g in got)
        for agg in AGGREGATIONS:
            for g, w in zip(got, golden["in_process"][name][agg]):
                assert g.steps == w["steps"]
                _same({**vars(g), "score": g.scores[agg]}, w)


def test_evaluation_pass_scores_are_the_golden_ones(golden, pairs, reference, ray_session, tmp_path):
    data = tmp_path / "rollouts"
    (data / "data").mkdir(parents=True)
    rows = [{**p, "correct": False, "extracted_answer": None} for p in pairs]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
        ("instruction_id", pa.string()), ("sample_index", pa.int32()), ("prompt", pa.string()),
        ("response", pa.string()), ("correct", pa.bool_()), ("extracted_answer", pa.string())])),
        data / "data" / "shard-000000.parquet")
    with_ref = EvaluateConfig(dtype="float64", batch_size=16, micro_batch_size=8, replicas=1)
    reference_logprobs(data, reference, tmp_path / "ref", with_ref)
    explicit = tmp_path / "explicit-prm"  # the shipped policy, read as an explicit PRM through its card
    explicit.mkdir()
    for f in Path(POLICY).iterdir():
        (explicit / f.name).symlink_to(f)
    (explicit / "prm_ray_prm.json").write_text(json.dumps({"kind": "explicit", "step_label_tokens": ["+", "-"]}))
    # The full Ray Data route for the implicit PRM (the reference pass, then scoring against it);
    # the same actor in process for the other two (Ray Data only batches and places it).
    score(tmp_path / "ref", POLICY, tmp_path / "scores-implicit", with_ref, golden["beta"])
    got = {"implicit": pq.read_table(tmp_path / "scores-implicit").to_pylist()}
    table = pq.read_table(data / "data")
    for name, prm in (("implicit_noref", POLICY), ("explicit", str(explicit))):
        actor = ModelPass(prm, "scores", dtype="float64", micro_batch_size=8, beta=golden["beta"])
        got[name] = [row for i in range(0, table.num_rows, 16) for row in actor(table.slice(i, 16)).to_pylist()]
    for name, rows in got.items():
        by_key = {(r["instruction_id"], r["sample_index"]): r for r in rows}
        for p, want in zip(pairs, golden["eval_pass"][name]):
            row = by_key[(p["instruction_id"], p["sample_index"])]
            for agg in AGGREGATIONS:
                _same(row, want, f"score_{agg}")


def test_serve_endpoint_scores_are_the_golden_ones(golden, pairs, reference, serve_instance):
    from ray import serve

    cfg = ServeConfig(prm=POLICY, reference_model=reference, beta=golden["beta"], dtype="float64", num_cpus=0.5,
                      name="golden")
    handle = serve.run(build_app(cfg), name=cfg.name, route_prefix="/golden")
    try:
        for agg in AGGREGATIONS:
            got = []
            for start in range(0, len(pairs), 4):  # one request at a time: each is a batch of its own
                group = pairs[start : start + 4]
                got += handle.rerank.remote(prompt=group[0]["prompt"], responses=[p["response"] for p in group],
                                            aggregation=agg).result(timeout_s=120)["results"]
            for g, w in zip(got, golden["serve"][agg]):
                _same(g, w)
    finally:
        serve.delete(cfg.name)
