"""Step-level ground truth: the arith step checker, ProcessBench's metrics, the step_eval job, the
ProcessBench loader and exact step labels as training data."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from prm_ray.core.process import choose_threshold, first_below, process_metrics, step_auc, threshold_curve
from prm_ray.core.reward import release_steps
from prm_ray.models import load_tokenizer
from prm_ray.policy import build_char_tokenizer
from prm_ray.tasks.arith import ArithConfig, ArithTask
from prm_ray.tokens import encode_pair

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

TASK = ArithTask()  # mod 10, +-*
PROBLEM = "7+5*3-2"  # ((7+5)*3)-2 mod 10: 2, 6, 4
RIGHT = ["Step 1: 7+5 = 2\n\n", "Step 2: 2*3 = 6\n\n", "Step 3: 6-2 = 4\n\n", "The answer is \\boxed{4}"]


def _check(steps, problem=PROBLEM):
    c = TASK.check_steps(problem, steps)
    return c.first_error, c.kind


def _with(k, text, steps=RIGHT):
    return steps[:k] + [text] + steps[k + 1 :]


# --------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, expected", [
    (RIGHT, (-1, None)),
    (_with(1, "Step 2: 2+3 = 5\n\n"), (1, "operator")),
    (_with(1, "Step 2: 2*4 = 8\n\n"), (1, "operand")),
    (_with(0, "Step 1: 8+5 = 3\n\n"), (0, "operand")),  # step 1 starts from the problem's number
    (_with(1, "Step 2: 3*3 = 9\n\n"), (1, "carry")),
    (_with(1, "Step 2: 2*3 = 7\n\n"), (1, "result")),
    (_with(1, "Step 2: 2*3 == 6\n\n"), (1, "malformed")),
    (_with(1, "Step 3: 2*3 = 6\n\n"), (1, "malformed")),  # numbered out of order
    (_with(2, "The answer is \\boxed{6}"), (2, "missing_step")),  # answer before the last operation
    (RIGHT[:3], (2, "missing_step")),  # cut off before the answer
    (RIGHT[:3] + ["Step 4: 4+0 = 4\n\n", RIGHT[3]], (3, "extra_step")),
    (RIGHT[:3] + ["The answer is \\boxed{4}\n\n", "Step 4: 4+0 = 4"], (4, "extra_step")),
    (RIGHT[:3] + ["The answer is \\boxed{4}\n\n", "so it is 4"], (4, "malformed")),
    (_with(3, "The answer is \\boxed{5}"), (3, "final_answer")),
    (_with(3, "The answer is \\boxed{four}"), (3, "final_answer")),
    ([""], (0, "missing_step")),  # an empty response (its one step holds the EOS)
])
def test_checker_names_the_first_wrong_step_and_its_kind(steps, expected):
    assert _check(steps) == expected
    assert set(k for _, k in [expected] if k) <= set(TASK.ERROR_KINDS)


def test_checker_sees_a_wrong_process_behind_a_right_answer():
    """Mod-10 errors can cancel: the outcome label says right, the checker finds step 1 wrong."""
    steps = ["Step 1: 1+3 = 4\n\n", "Step 2: 4+2 = 6\n\n", "The answer is \\boxed{6}"]
    assert TASK.verify("".join(steps), "6").correct
    assert _check(steps, "1+2+3") == (0, "operand")


def test_checker_on_the_pr_ms_own_split_blank_line_and_release():
    """Steps are the PRM's (encode_pair); the release split puts the answer line in the last step."""
    tok = build_char_tokenizer()
    right = "".join(RIGHT)
    item = encode_pair(tok, PROBLEM, right)
    assert item.steps == RIGHT and _check(item.steps) == (-1, None)
    # Two lines in one step: it is wrong if either is (here the second), and the rest is then extra.
    wrong = right.replace("2*3 = 6", "2*3 = 6\nStep 3: 6-2 = 5")
    assert _check(encode_pair(tok, PROBLEM, wrong).steps) == (1, "result")
    both_right = right.replace("2*3 = 6", "2*3 = 6\nStep 3: 6-2 = 4")
    assert _check(encode_pair(tok, PROBLEM, both_right).steps) == (2, "extra_step")
    release = release_steps(right.replace("boxed{4}", "boxed{5}"))
    assert len(release) == 3 and _check(release) == (2, "final_answer")
    assert _check(encode_pair(tok, PROBLEM, right, step_split="release").steps) == (-1, None)


@pytest.mark.parametrize("config", [ArithConfig(), ArithConfig(modulus=None, ops="+-*/", value_max=99)])
def test_reference_solutions_have_no_error(config):
    """1,000 reference solutions (and their release-split form) are right at every step."""
    task = ArithTask(config)
    tok = load_tokenizer("artifacts/policy")
    for inst in task.instructions("train", limit=1000):
        sol = inst.meta["solution"]
        assert task.check_steps(inst.prompt, encode_pair(tok, inst.prompt, sol).steps).first_error == -1, sol
        assert task.check_steps(inst.prompt, release_steps(sol)).first_error == -1, sol


def test_checker_refuses_what_it_cannot_check():
    with pytest.raises(ValueError, match="not an arith expression"):
        TASK.check_steps("What is 1+1?", RIGHT)
    with pytest.raises(ValueError, match="at least one step"):
        TASK.check_steps(PROBLEM, [])
    from prm_ray.tasks.math import MathTask

    with pytest.raises(NotImplementedError, match="no step checker"):
        MathTask.check_steps(MathTask.__new__(MathTask), "x", ["y"])


# --------------------------------------------------------------------------------------------
# ProcessBench's metrics
# --------------------------------------------------------------------------------------------


def test_metrics_on_hand_made_tables():
    rewards = [[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [0.5, 0.0]]
    first = [-1, 1, 0, -1]
    m = process_metrics(rewards, first, 0.0)  # the 0.0 reward equals the threshold: not an error
    assert (m["error_accuracy"], m["correct_accuracy"], m["f1"]) == (1.0, 1.0, 1.0)
    assert (m["with_error"], m["error_found"], m["without_error"], m["no_error_found"]) == (2, 2, 2, 2)
    m = process_metrics(rewards, first, 2.0)  # every first step is flagged
    assert (m["error_accuracy"], m["correct_accuracy"], m["f1"]) == (0.5, 0.0, 0.0)
    assert m["predicted_early"] == 1
    m = process_metrics(rewards, first, -5.0)  # nothing is flagged
    assert (m["error_accuracy"], m["correct_accuracy"], m["f1"]) == (0.0, 1.0, 0.0)
    assert m["predicted_late"] == 2
    assert process_metrics([[1.0]], [-1], 0.0)["f1"] is None  # no response with an error
    assert first_below([3.0, 0.0, -1.0], 0.0) == 2 and first_below([1.0], 0.0) == -1


def test_threshold_is_chosen_on_the_best_plateau_and_the_curve_is_exact():
    rewards = [[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [0.5, 0.0]]
    first = [-1, 1, 0, -1]
    t, objective = choose_threshold(rewards, first)
    assert objective == "f1" and -1.0 < t <= 0.0 and process_metrics(rewards, first, t)["f1"] == 1.0
    # Equal F1 (2/3) on the plateaus (0, 10] and (15, 20]: the lower one wins, at its midpoint.
    assert choose_threshold([[0.0], [10.0], [20.0, 15.0], [30.0]], [0, -1, 1, -1]) == (5.0, "f1")
    rng = random.Random(0)
    for _ in range(100):  # the sweep equals scoring at every threshold
        rs, es = [], []
        for _ in range(rng.randint(1, 10)):
            r = [rng.choice([-1.0, 0.0, 0.5, 1.0, rng.random()]) for _ in range(rng.randint(1, 5))]
            rs.append(r)
            es.append(rng.randint(-1, len(r) - 1))
        curve = threshold_curve(rs, es)
        for t, ea, ca in zip(curve["threshold"], curve["error_accuracy"], curve["correct_accuracy"]):
            m = process_metrics(rs, es, t)
            assert m["error_accuracy"] == pytest.approx(ea) and m["correct_accuracy"] == pytest.approx(ca)
    # Without one kind of response F1 is undefined: the defined accuracy is maximised instead.
    t, objective = choose_threshold([[1.0], [2.0, -1.0]], [-1, -1])
    assert objective == "correct_accuracy" and t < 1.0 and first_below([2.0, -1.0], t) == -1
    t, objective = choose_threshold([[1.0, 0.0], [3.0, 2.0]], [1, 1])
    assert objective == "error_accuracy" and 0.0 < t <= 1.0
    with pytest.raises(ValueError, match="outside its 2 steps"):
        process_metrics([[1.0, 2.0]], [2], 0.0)


def test_step_auc_by_hand():
    # right steps before a first error: 1, 2 (response 0), first wrong steps: 0 (response 0), 2 (response 1)
    a = step_auc([[1.0, 2.0, 0.0], [2.0], [5.0, 5.0]], [2, 0, -1])
    assert a == {"auc": pytest.approx(2.5 / 4), "right_steps": 2, "first_wrong_steps": 2}
    assert step_auc([[1.0]], [-1])["auc"] is None


# --------------------------------------------------------------------------------------------
# The job, end to end
# --------------------------------------------------------------------------------------------


def test_step_eval_job_end_to_end(tiny_rollouts, tiny_trained_policy, tiny_prm_path, ray_session, tmp_path):
    """jobs/step_eval.py on real rollouts: labels from the checker, the threshold from the
    validation responses, the report equal to what its per-response table says."""
    import step_eval

    from prm_ray.stages.step_eval import task_of

    rollouts, _ = tiny_rollouts
    policy = tiny_trained_policy[0].out
    out = tmp_path / "se"
    report = step_eval.main(["--prm", tiny_prm_path, "--reference_model", policy, "--rollouts", str(rollouts),
                             "--validation", str(rollouts), "--out", str(out), "--eval.replicas", "1",
                             "--eval.dtype", "float32"])
    saved = json.loads((out / "step_report.json").read_text())
    assert saved["f1"] == report["f1"] and set(saved["baselines"]) == {"policy log-likelihood", "random"}
    for name in ("step_rewards.png", "f1_threshold.png", "config.yaml"):
        assert (out / name).exists()
    rows = pq.read_table(out / "steps" / "data").to_pylist()
    assert len(rows) == report["labels"]["responses"] == 24
    task = task_of(rollouts)
    tok = load_tokenizer(tiny_prm_path)
    for r in rows:  # labels are the checker's on the PRM's own steps; predictions follow the threshold
        assert r["steps"] == encode_pair(tok, r["prompt"], r["response"]).steps
        assert r["first_error_true"] == task.check_steps(r["prompt"], r["steps"]).first_error
        assert r["first_error_pred"] == first_below(r["step_rewards"], report["threshold"])
        assert len(r["step_rewards"]) == len(r["steps"])
    errs = [r for r in rows if r["first_error_true"] >= 0]
    if errs:
        assert report["error_accuracy"] == pytest.approx(
            np.mean([r["first_error_pred"] == r["first_error_true"] for r in errs]))
    assert report["with_error"] == len(errs) == report["labels"]["with_error"]
    assert report["labels"]["right_answer_wrong_process"] == sum(bool(r["correct"]) for r in errs)
    assert report["labels"]["wrong_answer_no_step_error"] == 0
    assert report["threshold_from"] == "validation"
    assert (report["threshold"], report["threshold_objective"]) == choose_threshold(
        [r["step_rewards"] for r in rows], [r["first_error_true"] for r in rows])
    # The likelihood baseline is the policy's log-likelihood, step by step.
    ref = pq.read_table(out / "test" / "ref-logprobs" / "data").to_pydict()
    total = {(i, s): sum(v) for i, s, v in zip(ref["instruction_id"], ref["sample_index"], ref["ref_token_logp"])}
    from prm_ray.stages.step_eval import label_steps

    labels, _ = label_steps(rollouts, policy, task, ref_logprobs=out / "test" / "ref-logprobs")
    for i, s, lik in zip(*labels.select(["instruction_id", "sample_index", "likelihood_step_rewards"])
                         .to_pydict().values()):
        assert sum(lik) == pytest.approx(total[(i, s)], abs=1e-4)


def test_processbench_format(tiny_prm_path, tiny_policy_path, ray_session, tmp_path):
    """ProcessBench rows are scored as their given steps; rows that cannot be are counted."""
    from prm_ray.stages.evaluate import EvaluateConfig
    from prm_ray.stages.step_eval import StepEvalConfig, run_step_eval

    rows = [
        {"id": "a", "problem": "1+2", "steps": ["1+2 = 3", "So 3."], "label": -1},
        {"id": "b", "problem": "2+2", "steps": ["2+2 = 5", "So 5.", "Done."], "label": 0},
        {"id": "c", "problem": "3+3", "steps": ["3+3 = 6", "So 7."], "label": 1, "final_answer_correct": False},
        {"id": "d", "problem": "4+4", "steps": ["4+4 = 8", "  "], "label": -1},  # a blank step
        {"id": "e", "problem": "5+5", "steps": ["5+5\n\n= 10"], "label": -1},  # a step the split would cut
        {"id": "f", "problem": "6+6", "steps": ["6+6 = 12"], "label": 3},  # a label outside the steps
    ]
    path = tmp_path / "pb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pb"
    report = run_step_eval(StepEvalConfig(prm=tiny_prm_path, reference_model=tiny_policy_path, rollouts=str(path),
                                          threshold=-1.0, out=str(out),
                                          eval=EvaluateConfig(replicas=1, dtype="float32", use_reference=True)))
    info = report["processbench"]["test"]
    assert (info["rows"], info["used"]) == (6, 3)
    assert info["skipped"] == {"no_steps": 0, "blank_step": 1, "step_with_blank_line": 1, "bad_label": 1,
                               "split_mismatch": 0}
    assert report["threshold"] == -1.0 and report["threshold_from"] == "given"
    assert report["baselines"]["random"]["threshold_from"] == "in_sample"
    got = {r["instruction_id"]: r for r in pq.read_table(out / "steps" / "data").to_pylist()}
    assert [s.strip() for s in got["b"]["steps"]] == ["2+2 = 5", "So 5.", "Done."]
    assert {k: r["first_error_true"] for k, r in got.items()} == {"a": -1, "b": 0, "c": 1}
    assert got["c"]["correct"] is False and got["a"]["correct"] is True
    assert (report["with_error"], report["without_error"]) == (2, 1)


def test_exact_step_labels_are_training_data(tiny_rollouts, ray_session, tmp_path):
    """method exact writes the step-label schema from the checker: 1 until the first wrong step."""
    from prm_ray.stages.shepherd import ShepherdConfig, run_shepherd
    from prm_ray.stages.step_eval import task_of
    from prm_ray.stages.train.examples import DatasetConfig, build_examples

    rollouts, _ = tiny_rollouts
    summary = run_shepherd(ShepherdConfig(rollouts=str(rollouts), out=str(tmp_path / "exact"), method="exact",
                                          progress=False))
    assert summary["method"] == "exact" and summary["completions"] == 0 and summary["complete"]
    task = task_of(rollouts)
    rows = pq.read_table(tmp_path / "exact" / "data").to_pylist()
    assert len(rows) == summary["rows_labelled"] == 24
    for r in rows:
        first = task.check_steps(r["prompt"], r["steps"]).first_error
        assert r["step_labels_hard"] == [float(first < 0 or t < first) for t in range(len(r["steps"]))]
        assert r["step_labels_soft"] == r["step_labels_hard"]
    examples, rep = build_examples(tmp_path / "exact", DatasetConfig(objective="math-shepherd-hard"))
    assert examples.num_rows == rep["input_rows"] - sum(rep["rows_dropped"].values())
    again = run_shepherd(ShepherdConfig(rollouts=str(rollouts), out=str(tmp_path / "exact"), method="exact",
                                        progress=False))
    assert again["reused"]
