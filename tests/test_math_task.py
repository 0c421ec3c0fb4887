"""The `math` task: MATH-500 loading, answer extraction, math-verify verdicts, the deadline pool."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import sys
import threading
import time
from pathlib import Path

import pytest

from prm_ray.tasks import get_task
from prm_ray.tasks.base import Instruction, VerifyStatus
from prm_ray.tasks.deadline_pool import DeadlinePool, JobStatus, PoolStartupError
from prm_ray.tasks.math import DEFAULT_PROMPT_SUFFIX, MathTask, _normalise, verify_answer

# Golds that math-verify 0.9.0 cannot verify against themselves, with the reason. Empty: all 500
# MATH-500 golds parse (wrapped as `$gold$`, prediction as `\boxed{gold}`) and self-verify,
# including \text{...} words, base subscripts (2516_8), degrees, \$ amounts, pmatrix vectors,
# intervals/unions, `\pm` sets and `x \in [-2,7]`. Add an entry only with a reason.
SELF_VERIFY_ALLOW_LIST: dict[str, str] = {}


@pytest.fixture(scope="module")
def task():
    with MathTask(num_workers=2) as t:
        yield t


@pytest.fixture(scope="module")
def golds(task) -> list[str]:
    return [inst.answer for inst in task.instructions("test")]


# ---- data ----------------------------------------------------------------------------------

def test_shipped_math500_loads(task):
    insts = list(task.instructions("test"))
    assert len(insts) == 500
    assert len({i.id for i in insts}) == 500
    first = insts[0]
    assert first.id == "test/precalculus/807.json"
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.meta == {"subject": "Precalculus", "level": 2}  # no solution: it holds the answer
    assert [i.id for i in task.instructions("test", limit=3)] == [i.id for i in insts[:3]]
    assert list(task.instructions("test", limit=0)) == []
    assert task.splits() == ("test",)
    with pytest.raises(ValueError, match="no split 'train'.*valid splits: test"):
        list(task.instructions("train"))
    assert get_task("math").name == "math"


def test_format_instruction(task):
    inst = Instruction(id="x", prompt="What is $1+1$?", answer="2")
    text = task.format_instruction(inst)
    assert text == "What is $1+1$?" + DEFAULT_PROMPT_SUFFIX
    assert "\\boxed{}" in text and "blank line" in text
    custom = MathTask(prompt_suffix="\nAnswer in a box.")
    assert custom.format_instruction(inst) == "What is $1+1$?\nAnswer in a box."


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_user_file_is_one_split(tmp_path):
    path = _write(tmp_path / "mine.jsonl", [
        json.dumps({"problem": "1+1?", "answer": "2", "unique_id": "a"}),
        "",  # blank lines are ignored
        json.dumps({"problem": "2+2?", "answer": "4", "level": "Level 1"}),
    ])
    task = MathTask(path)
    for split in ("train", "test", "anything"):
        insts = list(task.instructions(split))
        assert [i.id for i in insts] == ["a", "mine-1"]
    assert insts[1].meta == {"level": "Level 1"}
    assert task.splits() is None


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(
        [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "4"}]), path)
    insts = MathTask(path).instructions("x")
    assert [(i.id, i.answer) for i in insts] == [("p-0", "2"), ("p-1", "4")]
    pq.write_table(pa.Table.from_pylist(
        [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": None}]), path)
    with pytest.raises(ValueError, match=r"p\.parquet, row 1: field 'answer' is missing"):
        MathTask(path)


GOOD = json.dumps({"problem": "1+1?", "answer": "2"})


@pytest.mark.parametrize("bad, where, message", [
    (json.dumps({"problem": "1+1?"}), "line 2", "field 'answer' is missing"),
    (json.dumps({"problem": "  ", "answer": "2"}), "line 2", "field 'problem' is empty"),
    (json.dumps({"problem": "1+1?", "answer": 2}), "line 2", "field 'answer' must be a string"),
    ('{"problem": "1+1?", "answer": ', "line 2", "invalid JSON"),
    ("[1, 2]", "line 2", "expected a JSON object"),
    (json.dumps({"problem": "x", "answer": "2", "unique_id": "data-0"}), "line 2",
     "duplicate id 'data-0'"),  # clashes with the generated id of row 0
])
def test_bad_rows_error_or_skip(tmp_path, bad, where, message):
    path = _write(tmp_path / "data.jsonl", [GOOD, bad, GOOD.replace("1+1", "3+3")])
    with pytest.raises(ValueError, match=re.escape(f"{path}, {where}: {message}")):
        MathTask(path)
    task = MathTask(path, on_bad_row="skip")
    assert [i.id for i in task.instructions("train")] == ["data-0", "data-2"]  # ids stay stable
    assert len(task.skipped_rows) == 1
    assert task.skipped_rows[0][0] == where and message in task.skipped_rows[0][1]


def test_unreadable_files(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing} does not exist")):
        MathTask(missing)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        MathTask(tmp_path)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=re.escape(f"cannot read math data file {binary}")):
        MathTask(binary)
    csv = _write(tmp_path / "data.csv", ["problem,answer"])
    with pytest.raises(ValueError, match="unsupported format '.csv'"):
        MathTask(csv)
    with pytest.raises(ValueError, match="on_bad_row"):
        MathTask(on_bad_row="ignore")  # type: ignore[arg-type]


# ---- extraction ----------------------------------------------------------------------------

@pytest.mark.parametrize("response, expected", [
    ("so \\boxed{1} then \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # last box wins, braces kept
    ("The answer is $42$.", "42"),
    ("I think the answer is: \\frac{3}{4}.\nDone", "\\frac{3}{4}"),
    ("The answer is .5", ".5"),
    ("the answer is 3, no wait. The answer is 4.", "4"),
    ("no final answer here", None),
    ("\\boxed{ }", None),
    ("cut off \\boxed{\\frac{1}{", None),
])
def test_extract_answer(task, response, expected):
    assert task.extract_answer(response) == expected


# ---- verification --------------------------------------------------------------------------

def test_every_math500_gold_verifies_against_itself(task, golds):
    # End to end: a response boxing the gold (decided by the exact-match pre-check)...
    verdicts = task.verify_batch([f"Step 1.\n\nSo the answer is $\\boxed{{{g}}}$." for g in golds],
                                 golds)
    assert all(v.status is VerifyStatus.OK and v.correct for v in verdicts)
    # ...and through math-verify itself, which the pre-check would otherwise skip.
    results = task.pool.map(verify_answer, [(g, g) for g in golds], timeout_s=10)
    failures = {g: (r.status.value, r.value, r.error) for g, r in zip(golds, results)
                if not (r.status is JobStatus.OK and r.value[0])}
    assert set(failures) == set(SELF_VERIFY_ALLOW_LIST), failures


EQUIVALENT = [  # (real MATH-500 gold, a differently written correct answer)
    ("\\frac{1}{2}", "0.5"),
    ("\\frac{1}{2}", "\\dfrac12"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"),
    ("x=5", "5"),
    ("1,-2", "-2, 1"),
    ("6 - 5i", "-5i + 6"),
    ("x^5 - x^4 + x^3 - x^2 + x - 1", "-1 + x - x^2 + x^3 - x^4 + x^5"),
    ("3\\sqrt{13}", "\\sqrt{117}"),
    ("90^\\circ", "90"),
    ("10,\\!080", "10080"),
    ("\\text{Evelyn}", "Evelyn"),
    ("\\$32,\\!348", "32348"),
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     "\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{5}{3} \\end{pmatrix}"),
    ("1 \\pm \\sqrt{19}", "1-\\sqrt{19}, 1+\\sqrt{19}"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("(a+5)(b+2)", "ab+2a+5b+10"),
    ("1\\frac{4}{5}", "1.8"),
    ("(0,9) \\cup (9,36)", "(9,36)\\cup(0,9)"),
    ("\\text{(C)}", "C"),
    ("864 \\mbox{ inches}^2", "864"),
]

NEAR_MISSES = [
    ("\\frac{14}{3}", "\\frac{3}{14}"),
    ("3\\sqrt{13}", "3\\sqrt{12}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(\\frac{\\pi}{2}, 3)"),
    ("6 - 5i", "6+5i"),
    ("(-2,1)", "[-2,1]"),
    ("-50", "50"),
    ("\\frac{1}{2}", "0.51"),
    ("x^3+3x-6", "x^3+3x+6"),
    ("p - q", "q - p"),
    ("1,-2", "1"),
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}"),
    ("\\text{(C)}", "\\text{(D)}"),
    ("90^\\circ", "\\frac{\\pi}{2}"),
]


def test_equivalent_rewritings_verify(task):
    golds = [g for g, _ in EQUIVALENT]
    verdicts = task.verify_batch([f"\\boxed{{{p}}}" for _, p in EQUIVALENT], golds)
    bad = [(g, p, v) for (g, p), v in zip(EQUIVALENT, verdicts)
           if not (v.status is VerifyStatus.OK and v.correct)]
    assert not bad
    assert task.verify("\\boxed{ \\frac{1}{2} }", "$\\frac{1}{2}$").detail == "exact match"


def test_wrong_answers_rejected(task, golds):
    # Each sampled gold against the next gold that differs; "x=5" vs "5" is the same answer to
    # math-verify (an assignment is compared by its value), so such pairs are not "different".
    def same(a: str, b: str) -> bool:
        strip = lambda s: re.sub(r"^[a-zA-Z]\s*=\s*", "", _normalise(s))  # noqa: E731
        return strip(a) == strip(b)

    pairs = []
    for i in random.Random(0).sample(range(len(golds)), 100):
        j = next(k % len(golds) for k in range(i + 1, i + len(golds))
                 if not same(golds[i], golds[k % len(golds)]))
        pairs.append((golds[i], golds[j]))
    pairs += NEAR_MISSES
    verdicts = task.verify_batch([f"\\boxed{{{p}}}" for _, p in pairs], [g for g, _ in pairs])
    wrong = [(g, p, v) for (g, p), v in zip(pairs, verdicts)
             if not (v.status is VerifyStatus.OK and not v.correct)]
    assert not wrong


def test_statuses_and_order(task):
    responses = ["\\boxed{2}", "no box at all", "\\boxed{\\tfrac12}", "\\boxed{5}", "\\boxed{3}",
                 "\\boxed{\\tfrac12}", "\\boxed{3}"]  # repeats are checked once, reported twice
    golds = ["2", "2", "0.5", "\\frac{", "4", "0.5", "3.0"]
    v = task.verify_batch(responses, golds)
    ok, error = VerifyStatus.OK, VerifyStatus.ERROR
    assert [x.status for x in v] == [ok, VerifyStatus.NO_ANSWER, ok, error, ok, ok, ok]
    assert [x.correct for x in v] == [True, False, True, False, False, True, True]
    assert v[1].extracted_answer is None
    assert "does not parse" in v[3].detail and v[3].extracted_answer == "5"
    assert task.verify("\\boxed{}", "2").status is VerifyStatus.NO_ANSWER
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        task.verify_batch(["a", "b"], ["c"])


def test_timeout_then_same_pool_recovers():
    with MathTask(timeout_s=1.0, num_workers=1) as task:
        pool = task.pool
        t0 = time.monotonic()
        v = task.verify("\\boxed{9^{9^{9^{9}}}}", "9")  # sympy evaluates the tower: never ends
        assert time.monotonic() - t0 < 10
        assert v.status is VerifyStatus.TIMEOUT and not v.correct
        assert v.extracted_answer == "9^{9^{9^{9}}}" and "1s" in v.detail
        assert task.pool is pool and pool.restarts == 1
        v = task.verify("\\boxed{0.5}", "\\frac{1}{2}")
        assert v.status is VerifyStatus.OK and v.correct


def test_math_verify_signal_trap_and_pool_from_thread(task):
    """math-verify's own timeouts raise off the main thread; ours work there, including a pool
    created inside the thread."""
    from math_verify import parse, verify

    out: dict[str, object] = {}

    def run() -> None:
        try:
            verify(parse("$1$"), parse("$1$"))  # default timeout_seconds=5 -> signal.alarm
        except ValueError as exc:
            out["trap"] = str(exc)
        out["shared"] = task.verify_batch(["\\boxed{0.5}"], ["\\frac{1}{2}"])[0]
        with DeadlinePool(1) as pool:
            out["own"] = pool.run(pow, 2, 10, timeout_s=30)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert "threaded environment" in str(out.get("trap"))
    shared = out["shared"]
    assert shared.status is VerifyStatus.OK and shared.correct and shared.detail != "exact match"
    assert out["own"].status is JobStatus.OK and out["own"].value == 1024


def test_task_pickles_without_its_pool(task):
    task.verify("\\boxed{1/2}", "0.5")  # make sure a pool exists
    clone = pickle.loads(pickle.dumps(task))
    assert clone._pool is None and len(list(clone.instructions("test", limit=2))) == 2


# ---- the pool on its own (stdlib functions pickle by reference: no test import in workers) ---

def test_pool_errors_crashes_and_deadlines():
    with DeadlinePool(1) as pool:
        res = pool.map(int, [("7",), ("x",), ("8",)], timeout_s=30)
        assert [r.status for r in res] == [JobStatus.OK, JobStatus.ERROR, JobStatus.OK]
        assert res[0].value == 7 and "ValueError: invalid literal" in res[1].error
        crash = pool.run(os._exit, 3, timeout_s=30)
        assert crash.status is JobStatus.ERROR and "exit code 3" in crash.error
        slow = pool.run(time.sleep, 30, timeout_s=0.3)
        assert slow.status is JobStatus.TIMEOUT and slow.elapsed_s < 5
        assert pool.run(abs, -2, timeout_s=30).value == 2
        assert pool.restarts == 2
        with pytest.raises(Exception, match="(?i)pickle"):
            pool.run(lambda: 1, timeout_s=30)
        assert pool.run(abs, -3, timeout_s=30).value == 3  # still usable
    assert pool.closed
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(abs, 1, timeout_s=1)
    with pytest.raises(PoolStartupError, match="initializer failed"):
        DeadlinePool(1, initializer=sys.exit)  # raises SystemExit in the worker
    with pytest.raises(TypeError, match="module-level function"):
        DeadlinePool(1, initializer=lambda: None)


def test_answer_groups_merge_equivalent_spellings(task):
    """Votes count answers, not spellings: correct answers vote as the gold; wrong ones merge
    when math-verify finds them equal; no answer gives no vote."""
    def verdicts(answers, gold):
        return [task.verify(f"so \\boxed{{{a}}}" if a is not None else "no idea", gold) for a in answers]

    answers = ["0.5", "\\dfrac{1}{2}", "\\frac12", "3", " 3 ", "\\frac{4}{6}", "\\frac23", "x+1", None]
    [keys] = task.answer_groups([(verdicts(answers, "\\frac{1}{2}"), "\\frac{1}{2}")])
    assert keys[:3] == ["\\frac{1}{2}"] * 3  # correct: the gold's key
    assert keys[3] == keys[4] == "3"  # whitespace
    assert keys[5] == keys[6] == "\\frac{4}{6}"  # equal math, named by the first seen
    assert keys[7] == "x+1" and keys[8] is None
    assert len(set(keys[:8])) == 4
    # Several problems in one call: groups never cross problems.
    a, b = task.answer_groups([(verdicts(["2", "4"], "1"), "1"), (verdicts(["4", "2"], "1"), "1")])
    assert a == ["2", "4"] and b == ["4", "2"]


def test_arith_groups_integers_as_integers():
    from prm_ray.tasks.arith import ArithTask

    arith = ArithTask()
    vs = [arith.verify(f"\\boxed{{{a}}}", "9") for a in ("09", "9", "+9", "8", "nine")]
    assert arith.answer_groups([(vs, "9")]) == [["9", "9", "9", "8", "nine"]]
