"""Training examples from rollouts: labels, exclusion, first-k, fractions, pairs, balancing, KTO's
mismatched completions, reading Parquet, and a report that accounts for every removed row.

Hand-built tables with known answers; pure pyarrow/Python (no torch, no Ray) except the check that
the objective table agrees with prm_ray.losses.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prm_ray.artifacts import load_rollouts
from prm_ray.config import ConfigError, from_dict
from prm_ray.core.objectives import OBJECTIVES
from prm_ray.stages.train.examples import (
    DatasetConfig,
    build_examples,
    describe,
    output_schema,
)

OBJECTIVE_PAIRED = {name: obj.paired for name, obj in OBJECTIVES.items()}
STEP_LABEL_COLUMNS = {name: obj.step_labels for name, obj in OBJECTIVES.items() if obj.explicit}

# status codes: c = ok & correct, w = ok & wrong, n = no_answer, t = timeout, e = error
_STATUS = {"c": ("ok", True), "w": ("ok", False), "n": ("no_answer", False),
           "t": ("timeout", False), "e": ("error", False)}


def make_rollouts(spec: dict[str, str], shuffle_seed: int | None = None, extra_columns: bool = False) -> pa.Table:
    """{instruction_id: "cwwn"} -> one row per character, sample_index = position."""
    rows = []
    for iid, codes in spec.items():
        for j, code in enumerate(codes):
            status, correct = _STATUS[code]
            rows.append({"instruction_id": iid, "prompt": f"prompt of {iid}", "response": f"{iid}/{j}",
                         "sample_index": j, "correct": correct, "verify_status": status})
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("instruction_id", pa.string()), ("prompt", pa.string()), ("response", pa.string()),
        ("sample_index", pa.int32()), ("correct", pa.bool_()), ("verify_status", pa.string())]))
    if extra_columns:  # like the rollout job's output
        n = table.num_rows
        table = table.append_column("gold_answer", pa.array(["42"] * n)).append_column(
            "num_tokens", pa.array([7] * n, pa.int32()))
    return table


def check_report(report: dict) -> None:
    """Every removed row / instruction is accounted for, and the report is JSON."""
    json.dumps(report)
    assert report["input_rows"] == sum(report["rows_dropped"].values()) + report["positives"] + report["negatives"]
    assert report["input_instructions"] == sum(report["instructions_dropped"].values()) + report["instructions_used"]
    assert report["rows_dropped"]["unverifiable"] == report["excluded_unverifiable"]
    assert isinstance(describe(report), str) and report["objective"] in describe(report)


def build(spec_or_table, **cfg):
    table = spec_or_table if isinstance(spec_or_table, pa.Table) else make_rollouts(spec_or_table)
    out, report = build_examples(table, DatasetConfig(**cfg))
    check_report(report)
    assert out.schema == output_schema(cfg.get("objective", "ce"))
    return out, report


# --------------------------------------------------------------------------------------------
# pairs
# --------------------------------------------------------------------------------------------

PAIR_SPEC = {"A": "cwcww", "B": "ccc", "C": "wnw"}  # A: 2 correct (0, 2) x 3 incorrect (1, 3, 4)


@pytest.mark.parametrize("objective", ["dpo", "nca"])
def test_pairs_are_every_correct_x_incorrect_and_one_class_instructions_are_dropped(objective):
    out, report = build(PAIR_SPEC, objective=objective)
    rows = out.to_pylist()
    assert {(r["chosen_index"], r["rejected_index"]) for r in rows} == {(c, w) for c in (0, 2) for w in (1, 3, 4)}
    assert len(rows) == 6 == report["pairs"] == report["rows"]
    for r in rows:
        assert r["instruction_id"] == "A" and r["prompt"] == "prompt of A"
        assert r["chosen"] == f"A/{r['chosen_index']}" and r["rejected"] == f"A/{r['rejected_index']}"
    assert [(r["chosen_index"], r["rejected_index"]) for r in rows] == sorted(
        (r["chosen_index"], r["rejected_index"]) for r in rows)
    assert report["instructions_dropped"]["all_correct"] == 1  # B
    assert report["instructions_dropped"]["all_incorrect"] == 1  # C (no_answer counts as wrong)
    assert report["rows_dropped"]["all_correct"] == 3 and report["rows_dropped"]["all_incorrect"] == 3
    assert report["instructions_used"] == 1 and report["positives"] == 2 and report["negatives"] == 3


def test_max_pairs_per_instruction_is_a_seeded_subset():
    all_pairs = {(c, w) for c in (0, 2) for w in (1, 3, 4)}
    samples = []
    for seed in range(8):
        out, report = build(PAIR_SPEC, objective="dpo", max_pairs_per_instruction=2, seed=seed)
        got = [(r["chosen_index"], r["rejected_index"]) for r in out.to_pylist()]
        assert len(got) == 2 == len(set(got)) and set(got) <= all_pairs
        assert got == sorted(got)
        again, _ = build(make_rollouts(PAIR_SPEC, shuffle_seed=seed + 100), objective="dpo",
                         max_pairs_per_instruction=2, seed=seed)
        assert again.equals(out)  # deterministic, whatever the input row order
        used = {i for p in got for i in p}
        assert report["rows_dropped"]["not_in_sampled_pairs"] == 5 - len(used)
        samples.append(frozenset(got))
    assert len(set(samples)) > 1  # the seed matters
    out, _ = build(PAIR_SPEC, objective="dpo", max_pairs_per_instruction=100)
    assert out.num_rows == 6  # a cap above the count keeps every pair


# --------------------------------------------------------------------------------------------
# first k
# --------------------------------------------------------------------------------------------

K_SPEC = {"q1": "cwcw", "q2": "wwcc", "q3": "cccw"}


def test_first_k_keeps_the_lowest_sample_indices_whatever_the_input_order():
    out, report = build(make_rollouts(K_SPEC, shuffle_seed=3), objective="ce", responses_per_instruction=1)
    assert out.column("sample_index").to_pylist() == [0, 0, 0]
    assert out.column("instruction_id").to_pylist() == ["q1", "q2", "q3"]
    assert out.column("response").to_pylist() == ["q1/0", "q2/0", "q3/0"]
    assert out.column("label").to_pylist() == [1, 0, 1]
    assert report["rows_after_first_k"] == 3 and report["rows_dropped"]["beyond_first_k"] == 9
    out2, _ = build(make_rollouts(K_SPEC, shuffle_seed=4), objective="ce", responses_per_instruction=2)
    assert out2.column("sample_index").to_pylist() == [0, 1, 0, 1, 0, 1]


def test_first_k_counts_only_verifiable_responses():
    out, report = build({"q1": "tcw", "q2": "wc"}, objective="ce", responses_per_instruction=1)
    assert list(zip(out.column("instruction_id").to_pylist(), out.column("sample_index").to_pylist())) == [
        ("q1", 1), ("q2", 0)]
    assert report["excluded_unverifiable"] == 1


def test_dpo_with_one_response_per_instruction_gives_an_empty_table_and_says_why():
    out, report = build(K_SPEC, objective="dpo", responses_per_instruction=1)
    assert out.num_rows == 0 and out.schema == output_schema("dpo")
    assert report["pairs"] == 0 and report["instructions_used"] == 0
    assert report["instructions_dropped"]["all_correct"] == 2 and report["instructions_dropped"]["all_incorrect"] == 1
    assert any("responses_per_instruction=1" in n for n in report["notes"])
    assert "not defined" in describe(report)
    # k=2 already gives pairs where the first two responses disagree (q1 only)
    out2, report2 = build(K_SPEC, objective="dpo", responses_per_instruction=2)
    assert out2.to_pylist() == [{"instruction_id": "q1", "prompt": "prompt of q1", "chosen": "q1/0",
                                 "rejected": "q1/1", "chosen_index": 0, "rejected_index": 1}]


# --------------------------------------------------------------------------------------------
# instruction fraction
# --------------------------------------------------------------------------------------------

TEN = {f"i{n:02d}": "cw" for n in range(10)}


def _ids(out: pa.Table) -> list[str]:
    return sorted(set(out.column("instruction_id").to_pylist()))


def test_instruction_fraction_is_seeded_and_stable():
    out, report = build(TEN, objective="ce", instruction_fraction=0.5, seed=0)
    chosen = _ids(out)
    assert len(chosen) == 5 == report["instructions_after_fraction"] == report["instructions_used"]
    assert report["instructions_dropped"]["not_sampled"] == 5 and report["rows_dropped"]["not_sampled"] == 10
    assert out.num_rows == 10  # both responses of each kept instruction
    same, _ = build(make_rollouts(TEN, shuffle_seed=9), objective="ce", instruction_fraction=0.5, seed=0)
    assert _ids(same) == chosen  # input order does not matter
    other, _ = build(TEN, objective="ce", instruction_fraction=0.5, seed=1)
    assert _ids(other) != chosen
    assert len({tuple(_ids(build(TEN, objective="ce", instruction_fraction=0.5, seed=s)[0])) for s in range(6)}) > 2
    # the kept instructions do not depend on the objective (same stream): dpo uses the same five
    pairs, _ = build(TEN, objective="dpo", instruction_fraction=0.5, seed=0)
    assert _ids(pairs) == chosen
    small, _ = build(TEN, objective="ce", instruction_fraction=0.01)
    assert len(_ids(small)) == 1  # never zero instructions


# --------------------------------------------------------------------------------------------
# balancing
# --------------------------------------------------------------------------------------------

BAL_SPEC = {"A": "ccccw", "B": "ccc", "C": "cww", "D": "ww"}  # 8 correct, 5 incorrect


def test_dataset_wise_balancing_subsamples_the_majority_to_the_minority_count():
    out, report = build(BAL_SPEC, objective="ce", balance="dataset", seed=5)
    labels = Counter(out.column("label").to_pylist())
    assert labels == {1: 5, 0: 5} and report["positives"] == report["negatives"] == 5
    assert report["dropped_by_balancing"] == 3 == report["rows_dropped"]["balancing"]
    negatives = {r["response"] for r in out.to_pylist() if r["label"] == 0}
    assert negatives == {"A/4", "C/1", "C/2", "D/0", "D/1"}  # the minority class is kept whole
    again, _ = build(make_rollouts(BAL_SPEC, shuffle_seed=1), objective="ce", balance="dataset", seed=5)
    assert again.equals(out)
    picks = {tuple(build(BAL_SPEC, objective="ce", balance="dataset", seed=s)[0].column("response").to_pylist())
             for s in range(6)}
    assert len(picks) > 1
    unbalanced, r0 = build(BAL_SPEC, objective="ce")
    assert unbalanced.num_rows == 13 and r0["dropped_by_balancing"] == 0


def test_dataset_wise_balancing_with_one_class_removes_everything_and_says_so():
    out, report = build({"A": "cc", "B": "c"}, objective="ce", balance="dataset")
    assert out.num_rows == 0 and report["instructions_dropped"]["balanced_away"] == 2
    assert report["notes"]


def test_instruction_wise_balancing_equalises_each_instruction_and_drops_one_class_ones():
    out, report = build(BAL_SPEC, objective="ce", balance="instruction", seed=2)
    per = {}
    for r in out.to_pylist():
        per.setdefault(r["instruction_id"], Counter())[r["label"]] += 1
    assert per == {"A": {1: 1, 0: 1}, "C": {1: 1, 0: 1}}
    assert report["instructions_dropped"]["all_correct"] == 1 and report["instructions_dropped"]["all_incorrect"] == 1
    assert report["rows_dropped"]["all_correct"] == 3 and report["rows_dropped"]["all_incorrect"] == 2
    assert report["rows_dropped"]["balancing"] == 3 + 1  # A: 3 extra correct; C: 1 extra incorrect
    assert report["dropped_by_balancing"] == 3 + 1 + 3 + 2
    assert report["instructions_used"] == 2 and out.num_rows == 4
    kto, _ = build(BAL_SPEC, objective="kto", balance="instruction", seed=2)
    assert kto.select(["instruction_id", "response", "label"]).equals(
        out.select(["instruction_id", "response", "label"]))


@pytest.mark.parametrize(
    "cfg, field",
    [({"objective": "dpo", "balance": "dataset"}, "balance"),
     ({"objective": "nca", "balance": "instruction"}, "balance"),
     ({"objective": "ce", "balance": "class"}, "balance"),
     ({"objective": "ipo"}, "objective"),
     ({"responses_per_instruction": 0}, "responses_per_instruction"),
     ({"instruction_fraction": 0.0}, "instruction_fraction"),
     ({"instruction_fraction": 1.5}, "instruction_fraction"),
     ({"objective": "ce", "max_pairs_per_instruction": 2}, "max_pairs_per_instruction"),
     ({"objective": "dpo", "max_pairs_per_instruction": 0}, "max_pairs_per_instruction")],
)
def test_bad_config_raises_config_error_naming_the_field(cfg, field):
    with pytest.raises(ConfigError, match=field):
        DatasetConfig(**cfg)
    with pytest.raises(ConfigError, match=field):
        from_dict(DatasetConfig, cfg)


def test_config_loads_from_dict():
    cfg = from_dict(DatasetConfig, {"objective": "dpo", "responses_per_instruction": "4",
                                    "max_pairs_per_instruction": None, "instruction_fraction": "0.25"})
    assert cfg.responses_per_instruction == 4 and cfg.instruction_fraction == 0.25


# --------------------------------------------------------------------------------------------
# labels and exclusion
# --------------------------------------------------------------------------------------------


def test_unverifiable_rows_are_excluded_and_counted_and_no_answer_is_wrong():
    out, report = build({"A": "ctnwe", "B": "tt", "C": "n"}, objective="ce")
    rows = {r["response"]: r["label"] for r in out.to_pylist()}
    assert rows == {"A/0": 1, "A/2": 0, "A/3": 0, "C/0": 0}
    assert out.schema.field("label").type == pa.int8()
    assert report["excluded_unverifiable"] == 4
    assert report["excluded_by_status"] == {"timeout": 3, "error": 1}
    assert report["instructions_dropped"]["all_unverifiable"] == 1  # B
    assert report["input_rows"] == 8 and report["input_instructions"] == 3 and report["instructions_used"] == 2


def test_inconsistent_or_duplicate_rows_raise():
    bad = make_rollouts({"A": "cw"}).to_pylist()
    bad[0]["verify_status"] = "no_answer"  # correct but no answer
    with pytest.raises(ValueError, match="correct"):
        build_examples(pa.Table.from_pylist(bad), DatasetConfig())
    bad[0]["verify_status"] = "maybe"
    with pytest.raises(ValueError, match="maybe"):
        build_examples(pa.Table.from_pylist(bad), DatasetConfig())
    dup = make_rollouts({"A": "cw"}).to_pylist()
    dup[1]["sample_index"] = 0
    with pytest.raises(ValueError, match="duplicate"):
        build_examples(pa.Table.from_pylist(dup), DatasetConfig())
    two_prompts = make_rollouts({"A": "cw"}).to_pylist()
    two_prompts[1]["prompt"] = "another prompt"
    with pytest.raises(ValueError, match="prompts"):
        build_examples(pa.Table.from_pylist(two_prompts), DatasetConfig())


# --------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------


def test_kto_kl_response_always_comes_from_another_instruction():
    spec = {"A": "cwcwc", "B": "w", "C": "ccw", "D": "wwwwwwww", "E": "cw"}
    for seed in range(5):
        out, report = build(spec, objective="kto", seed=seed)
        rows = out.to_pylist()
        assert len(rows) == 19
        for r in rows:
            assert r["kl_instruction_id"] != r["instruction_id"]
            assert r["kl_response"] == f"{r['kl_instruction_id']}/{r['kl_sample_index']}"
        again, _ = build(make_rollouts(spec, shuffle_seed=seed), objective="kto", seed=seed)
        assert again.equals(out)
    # equal group sizes: the mismatched completions are a permutation of the responses
    out, _ = build(TEN, objective="kto", seed=3)
    assert sorted(out.column("kl_response").to_pylist()) == sorted(out.column("response").to_pylist())
    assert all(a.split("/")[0] != b.split("/")[0] for a, b in
               zip(out.column("response").to_pylist(), out.column("kl_response").to_pylist()))
    with pytest.raises(ValueError, match="at least 2 instructions"):
        build_examples(make_rollouts({"A": "cw"}), DatasetConfig(objective="kto"))


def test_unpaired_output_is_sorted_and_has_the_documented_columns():
    out, _ = build(make_rollouts(BAL_SPEC, shuffle_seed=7), objective="ce")
    keys = list(zip(out.column("instruction_id").to_pylist(), out.column("sample_index").to_pylist()))
    assert keys == sorted(keys)
    assert out.schema.names == ["instruction_id", "prompt", "response", "sample_index", "label"]
    assert output_schema("kto").names[-3:] == ["kl_instruction_id", "kl_sample_index", "kl_response"]
    assert output_schema("nca").names == ["instruction_id", "prompt", "chosen", "rejected", "chosen_index",
                                          "rejected_index"]
    for schema in (output_schema(o) for o in OBJECTIVE_PAIRED):
        assert not any(n.startswith("ref_logp") for n in schema.names)  # reserved for the reference stage


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def test_reads_a_rollout_output_directory(tmp_path):
    full = make_rollouts(PAIR_SPEC, extra_columns=True)
    data = tmp_path / "run" / "data"
    data.mkdir(parents=True)
    pq.write_table(full.slice(0, 6), data / "shard-000000.parquet")
    pq.write_table(full.slice(6), data / "shard-000001.parquet")
    (data / ".shard-000002.parquet.tmp-123").write_bytes(b"half-written")  # ignored, as in the rollout job
    (tmp_path / "run" / "summary.json").write_text("{}")
    expected, _ = build_examples(full, DatasetConfig(objective="dpo"))
    for source in (tmp_path / "run", data, str(data / "shard-000000.parquet")):
        out, report = build_examples(source, DatasetConfig(objective="dpo"))
        check_report(report)
        if source != str(data / "shard-000000.parquet"):
            assert out.equals(expected)
            assert report["input_rows"] == 11
    single, report = build_examples(data / "shard-000000.parquet", DatasetConfig(objective="dpo"))
    assert report["input_rows"] == 6 and single.num_rows == 6  # A's five rows + one of B
    assert load_rollouts(tmp_path / "run").num_rows == 11
    assert load_rollouts(tmp_path / "run", columns=["response"]).schema.names == ["response"]


def test_missing_columns_and_missing_data_raise_clear_errors(tmp_path):
    table = make_rollouts(PAIR_SPEC).drop_columns(["verify_status", "sample_index"])
    with pytest.raises(ValueError, match="missing column\\(s\\) sample_index, verify_status"):
        build_examples(table, DatasetConfig())
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "shard-000000.parquet")
    with pytest.raises(ValueError, match="sample_index, verify_status"):
        build_examples(tmp_path, DatasetConfig())
    with pytest.raises(FileNotFoundError):
        load_rollouts(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Parquet"):
        load_rollouts(tmp_path / "empty")


def test_empty_input_gives_empty_tables():
    empty = make_rollouts({})
    for objective in OBJECTIVE_PAIRED:
        table = empty
        if objective in STEP_LABEL_COLUMNS:
            table = empty.append_column(STEP_LABEL_COLUMNS[objective], pa.array([], pa.list_(pa.float32())))
        out, report = build(table, objective=objective)
        assert out.num_rows == 0 and report["rows"] == 0


def test_step_label_objectives_take_the_labels_of_the_rows_they_keep():
    table = make_rollouts(PAIR_SPEC)
    labels = [[1.0] * (1 + i % 3) + [float(i % 2)] for i in range(table.num_rows)]
    soft = [[v / 2 for v in row] for row in labels]
    table = table.append_column("step_labels_hard", pa.array(labels, pa.list_(pa.float32())))
    table = table.append_column("step_labels_soft", pa.array(soft, pa.list_(pa.float32())))
    by_key = {(r["instruction_id"], r["sample_index"]): r for r in table.to_pylist()}
    for objective, col in STEP_LABEL_COLUMNS.items():
        out, report = build(table, objective=objective, responses_per_instruction=2)
        check_report(report)
        assert out.schema == output_schema(objective) and out.num_rows == report["rows"] > 0
        for row in out.to_pylist():
            src = by_key[(row["instruction_id"], row["sample_index"])]
            assert row["step_labels"] == pytest.approx(src[col]) and row["response"] == src["response"]
    with pytest.raises(ValueError, match="Math-Shepherd labelling"):
        build(make_rollouts(PAIR_SPEC), objective="math-shepherd-hard")
    bad = table.set_column(table.schema.get_field_index("step_labels_soft"), "step_labels_soft",
                           pa.array([[1.5]] * table.num_rows, pa.list_(pa.float32())))
    with pytest.raises(ValueError, match="step_labels_soft must be"):
        build(bad, objective="math-shepherd-soft")
    with pytest.raises(ConfigError, match="step labels"):
        DatasetConfig(objective="math-shepherd-hard", balance="dataset")


def test_selected_rows_are_the_rows_the_examples_come_from():
    from prm_ray.stages.train.examples import selected_rows

    table = make_rollouts(BAL_SPEC, shuffle_seed=3)
    for kw in (dict(), dict(responses_per_instruction=2), dict(instruction_fraction=0.5, seed=4)):
        rows = selected_rows(table, DatasetConfig(objective="ce", **kw))
        out, report = build(table, objective="ce", **kw)
        assert len(rows) == report["rows_after_first_k"] == out.num_rows
        keys = {(table.column("instruction_id")[i].as_py(), table.column("sample_index")[i].as_py()) for i in rows}
        assert keys == set(zip(out.column("instruction_id").to_pylist(), out.column("sample_index").to_pylist()))
