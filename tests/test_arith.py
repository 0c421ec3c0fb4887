"""The arith world: generator, splits, reference solutions, verifier."""

import pytest

from prm_ray.tasks import VerifyStatus, get_task
from prm_ray.tasks.arith import ArithConfig, ArithTask


@pytest.fixture(scope="module")
def task():
    return ArithTask(ArithConfig(num_train=3000, num_validation=300, num_test=300))


def test_splits_are_disjoint_and_deterministic(task):
    splits = {s: [i.prompt for i in task.instructions(s)] for s in ("train", "validation", "test")}
    assert [len(v) for v in splits.values()] == [3000, 300, 300]
    for name, prompts in splits.items():
        assert len(set(prompts)) == len(prompts), f"duplicates within {name}"
    assert not set(splits["train"]) & set(splits["test"])
    assert not set(splits["train"]) & set(splits["validation"])
    assert not set(splits["validation"]) & set(splits["test"])
    again = [i.prompt for i in ArithTask(task.config).instructions("test")]
    assert again == splits["test"]
    # A split does not depend on the other splits' sizes, and limit takes a prefix.
    other = ArithTask(ArithConfig(num_train=10, num_test=300))
    assert [i.prompt for i in other.instructions("test", limit=50)] == splits["test"][:50]


def test_seed_changes_problems():
    a = [i.prompt for i in ArithTask(seed=0).instructions("test", limit=20)]
    b = [i.prompt for i in ArithTask(seed=1).instructions("test", limit=20)]
    assert a != b


def test_reference_solution_format_and_answer(task):
    inst = next(task.instructions("train"))
    sol = inst.meta["solution"]
    steps = sol.split("\n\n")
    assert len(steps) == inst.meta["num_steps"] + 1
    assert steps[0].startswith("Step 1: ")
    assert steps[-1] == f"The answer is \\boxed{{{inst.answer}}}"
    assert task.verify(sol, inst.answer).correct


def test_semantics_left_to_right_mod_10():
    t = ArithTask()
    steps, value = t.solve("7+5*3-2")
    assert steps == [(7, "+", 5, 2), (2, "*", 3, 6), (6, "-", 2, 4)]
    assert value == 4
    assert t.solution("7+5*3-2") == (
        "Step 1: 7+5 = 2\n\nStep 2: 2*3 = 6\n\nStep 3: 6-2 = 4\n\nThe answer is \\boxed{4}"
    )
    assert t.solve("3-5")[1] == 8  # negative results wrap


def test_no_modulus_keeps_values_in_range_and_division_exact():
    t = ArithTask(modulus=None, ops="+-*/", value_max=50, operand_max=12, num_test=200)
    for inst in t.instructions("test"):
        steps, value = t.solve(inst.prompt)
        assert all(0 <= c <= 50 for *_, c in steps)
        assert all(a % b == 0 for a, op, b, _ in steps if op == "/")
        assert str(value) == inst.answer


def test_difficulty_knobs(task):
    t = ArithTask(min_steps=6, max_steps=6, ops="+", num_test=20)
    for inst in t.instructions("test"):
        assert inst.meta["num_steps"] == 6 and set(inst.prompt) <= set("0123456789+")


@pytest.mark.parametrize(
    "kwargs, field",
    [({"min_steps": 0}, "min_steps"), ({"ops": "+^"}, "ops"), ({"modulus": 1}, "modulus"),
     ({"ops": "+/", "modulus": 10}, "'/'"), ({"operand_min": 5, "operand_max": 2}, "operand_min")],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ArithConfig(**kwargs)


def test_world_too_small_is_an_error_not_a_hang():
    t = ArithTask(min_steps=1, max_steps=1, ops="+", operand_max=1, num_test=50)
    with pytest.raises(ValueError, match="too small"):
        list(t.instructions("test"))


def test_verifier_statuses():
    t = get_task("arith")
    assert t.verify("Step 1: 1+1 = 2\n\nThe answer is \\boxed{2}", "2").correct
    v = t.verify("The answer is \\boxed{3}", "2")
    assert (v.correct, v.status) == (False, VerifyStatus.OK)
    v = t.verify("Step 1: 1+1 = 2", "2")
    assert (v.correct, v.status) == (False, VerifyStatus.NO_ANSWER)
    v = t.verify("\\boxed{two}", "2")
    assert (v.correct, v.status, v.extracted_answer) == (False, VerifyStatus.OK, "two")
    v = t.verify("\\boxed{1} then \\boxed{ 2 }", "2")  # the last box wins
    assert v.correct and v.extracted_answer == "2"
    assert t.verify("\\boxed{2}", "x").status is VerifyStatus.ERROR
    with pytest.raises(ValueError, match="split"):
        next(t.instructions("dev"))
