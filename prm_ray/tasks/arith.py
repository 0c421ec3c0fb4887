"""The embedded default task: a synthetic multi-step arithmetic world.

A problem is a chain of operations applied left to right, e.g. `7+5*3-2` means ((7+5)*3)-2.
With the default `modulus=10` every intermediate value is taken mod 10, so each step is a lookup
in a small fact table (300 facts for `+-*`): a tiny model can learn the world, and a learned PRM
can learn which facts the policy gets wrong. Reference solutions use the paper's step format:

    Step 1: 7+5 = 2

    Step 2: 2*3 = 6

    Step 3: 6-2 = 4

    The answer is \\boxed{4}

Splits are disjoint by construction: a problem's split is a function of a hash of its text, so no
seed, size or difficulty setting can put the same problem in two splits.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prm_ray.config import param
from prm_ray.tasks.base import Instruction, StepCheck, Task, Verdict, VerifyStatus, last_boxed

SPLITS = ("train", "validation", "test")
# Share of the problem space (by hash bucket out of 100) owned by each split.
_SPLIT_BUCKETS = {"test": range(0, 10), "validation": range(10, 20), "train": range(20, 100)}
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": None}
_INT = re.compile(r"^[+-]?\d+$")
_OP_LINE = re.compile(r"^Step\s+(\d+)\s*:\s*(-?\d+)\s*([+\-*/])\s*(-?\d+)\s*=\s*(-?\d+)$")
_ANSWER_LINE = re.compile(r"^The answer is\s*\\boxed\{([^{}]*)\}\s*\.?$")


@dataclass
class ArithConfig:
    """Difficulty knobs of the arithmetic world."""

    min_steps: int = param(2, "operations per problem, at least")
    max_steps: int = param(5, "operations per problem, at most")
    operand_min: int = param(0, "smallest operand")
    operand_max: int = param(9, "largest operand")
    ops: str = param("+-*", "the operators a problem may use (/ only without a modulus)")
    modulus: int | None = param(10, "values are reduced mod this after every step; null: plain integers, kept "
                                     "within [0, value_max], with exact division only")
    value_max: int = param(99, "the largest value without a modulus")
    num_train: int = param(20000, "problems in the train split")
    num_validation: int = param(500, "problems in the validation split")
    num_test: int = param(500, "problems in the test split")
    seed: int = param(0, "the problem generator's seed")

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"need 1 <= min_steps <= max_steps, got min_steps={self.min_steps}, "
                f"max_steps={self.max_steps}"
            )
        if not 0 <= self.operand_min <= self.operand_max:
            raise ValueError(
                f"need 0 <= operand_min <= operand_max, got {self.operand_min}, {self.operand_max}"
            )
        bad = set(self.ops) - set(_OPS)
        if not self.ops or bad:
            raise ValueError(f"ops must be a non-empty subset of '+-*/', got {self.ops!r}")
        if self.modulus is not None and self.modulus < 2:
            raise ValueError(f"modulus must be >= 2 or None, got {self.modulus}")
        if self.modulus is not None and "/" in self.ops:
            raise ValueError("ops: '/' is only defined without a modulus (modulus: null)")
        for name in ("num_train", "num_validation", "num_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _bucket(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") % 100


class ArithTask(Task):
    name = "arith"
    ERROR_KINDS = ("malformed", "carry", "operator", "operand", "result", "missing_step", "extra_step",
                   "final_answer")

    def __init__(self, config: ArithConfig | None = None, **overrides) -> None:
        if config is None:
            config = ArithConfig(**overrides)
        elif overrides:
            raise TypeError("pass either an ArithConfig or keyword overrides, not both")
        self.config = config

    # -- the world --------------------------------------------------------------------------
    def _apply(self, value: int, op: str, operand: int) -> int | None:
        """Result of one step, or None if the step is not allowed here."""
        c = self.config
        if op == "/":
            if operand == 0 or value % operand:
                return None
            out = value // operand
        else:
            out = _OPS[op](value, operand)
        if c.modulus is not None:
            return out % c.modulus
        return out if 0 <= out <= c.value_max else None

    def _sample_problem(self, rng: random.Random) -> list[tuple[str, int]] | None:
        c = self.config
        hi = c.operand_max if c.modulus is None else min(c.operand_max, c.modulus - 1)
        start = rng.randint(c.operand_min, hi)
        chain: list[tuple[str, int]] = [("", start)]
        value = start
        for _ in range(rng.randint(c.min_steps, c.max_steps)):
            for _attempt in range(50):
                op, operand = rng.choice(c.ops), rng.randint(c.operand_min, c.operand_max)
                nxt = self._apply(value, op, operand)
                if nxt is not None:
                    break
            else:
                return None
            chain.append((op, operand))
            value = nxt
        return chain

    @staticmethod
    def expression(chain: list[tuple[str, int]]) -> str:
        return "".join(f"{op}{x}" for op, x in chain)

    def parse_expression(self, expr: str) -> list[tuple[str, int]]:
        tokens = re.findall(r"([+\-*/]?)(\d+)", expr)
        if not tokens or "".join(a + b for a, b in tokens) != expr or tokens[0][0]:
            raise ValueError(f"not an arith expression: {expr!r}")
        return [(op, int(x)) for op, x in tokens]

    def solve(self, expr: str) -> tuple[list[tuple[int, str, int, int]], int]:
        """The steps (value, op, operand, result) of a problem and its final value."""
        chain = self.parse_expression(expr)
        value = chain[0][1]
        steps = []
        for op, operand in chain[1:]:
            nxt = self._apply(value, op, operand)
            if nxt is None:
                raise ValueError(f"step {value}{op}{operand} is outside this world in {expr!r}")
            steps.append((value, op, operand, nxt))
            value = nxt
        return steps, value

    def solution(self, expr: str) -> str:
        """Reference solution in the paper's step format (steps separated by a blank line)."""
        steps, value = self.solve(expr)
        lines = [f"Step {i}: {a}{op}{b} = {c}" for i, (a, op, b, c) in enumerate(steps, 1)]
        lines.append(f"The answer is \\boxed{{{value}}}")
        return "\n\n".join(lines)

    # -- Task interface -------------------------------------------------------------------------
    def split_size(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for task 'arith': expected one of {SPLITS}")
        return getattr(self.config, f"num_{split}")

    def instructions(self, split: str, limit: int | None = None) -> Iterator[Instruction]:
        size = self.split_size(split)
        if limit is not None:
            size = min(size, limit)
        # Seeded per split, so a split's problems do not depend on the other splits' sizes.
        rng = random.Random(f"{self.config.seed}-{split}")
        buckets = _SPLIT_BUCKETS[split]
        seen: set[str] = set()
        misses = 0
        while len(seen) < size:
            chain = self._sample_problem(rng)
            expr = self.expression(chain) if chain else None
            if expr is None or expr in seen or _bucket(expr) not in buckets:
                misses += 1
                if misses > 200 * size + 10_000:
                    raise ValueError(
                        f"the arith world is too small for {size} distinct {split} problems "
                        f"(config {self.config}); widen steps, operands or ops"
                    )
                continue
            seen.add(expr)
            _, answer = self.solve(expr)
            yield Instruction(
                id=f"arith-{split}-{len(seen) - 1:06d}",
                prompt=expr,
                answer=str(answer),
                meta={"num_steps": len(chain) - 1, "solution": self.solution(expr)},
            )

    def extract_answer(self, response: str) -> str | None:
        boxed = last_boxed(response)
        return boxed.strip() if boxed is not None else None

    def answer_groups(self, problems: Sequence[tuple[Sequence[Verdict], str]]) -> list[list[str | None]]:
        """Integers vote as integers ("09" with "9"); anything else as its exact string."""
        def key(a: str | None) -> str | None:
            return str(int(a)) if a is not None and _INT.match(a) else a

        return [[key(v.extracted_answer) for v in verdicts] for verdicts, _ in problems]

    def check_steps(self, problem: str, steps: Sequence[str]) -> StepCheck:
        """The first wrong step of a response to ``problem`` (an expression such as ``7+5*3``).

        Each step's lines are read in order against the problem's operations; the first line that
        is not the next expected one is the error, named by kind:

        * ``malformed``: a line that is neither ``Step k: a<op>b = c`` nor ``The answer is
          \\boxed{x}``, or a step numbered out of order;
        * ``carry``: ``a`` is not the previous step's result; ``operand``: ``b`` (or, in step 1,
          ``a``) is not the problem's number; ``operator``: ``<op>`` is not the problem's;
        * ``result``: ``c`` is not ``a<op>b`` in this world (mod ``modulus``);
        * ``missing_step``: the final answer (or the end of the response) comes before every
          operation is done; ``extra_step``: an operation after the last one, or text after the answer;
        * ``final_answer``: the boxed answer is not the last step's result.

        A step is right only if every line in it is, so the checker works on any split (the
        blank-line split puts one line in a step; the released eval's puts the answer line in the
        last ``Step N:`` step).
        """
        if not steps:
            raise ValueError("check_steps needs at least one step (a scored response has one even when empty)")
        ops = self.parse_expression(problem.strip())
        value, done, n, answered = ops[0][1], 0, len(ops) - 1, False
        for k, text in enumerate(steps):
            for line in filter(None, (x.strip() for x in text.split("\n"))):
                op_line = _OP_LINE.match(line)
                if answered:
                    return StepCheck(k, "extra_step" if op_line else "malformed", f"text after the final answer: {line!r}")
                if op_line:
                    if done == n:
                        return StepCheck(k, "extra_step", f"operation {done + 1} of a problem with {n}")
                    num, a, op, b, c = int(op_line[1]), int(op_line[2]), op_line[3], int(op_line[4]), int(op_line[5])
                    want_op, want_b = ops[done + 1]
                    if num != done + 1:
                        return StepCheck(k, "malformed", f"numbered Step {num}, expected Step {done + 1}")
                    if a != value:
                        return StepCheck(k, "carry" if done else "operand",
                                         f"starts from {a}, expected {value}" + ("" if done else " (the problem's)"))
                    if op != want_op:
                        return StepCheck(k, "operator", f"operator {op}, the problem's is {want_op}")
                    if b != want_b:
                        return StepCheck(k, "operand", f"operand {b}, the problem's is {want_b}")
                    result = self._apply(a, op, b)
                    if result != c:
                        return StepCheck(k, "result", f"{a}{op}{b} = {c}, expected {result}")
                    value, done = c, done + 1
                    continue
                answer = _ANSWER_LINE.match(line)
                if answer is None:
                    return StepCheck(k, "malformed", f"not a step: {line!r}")
                if done < n:
                    return StepCheck(k, "missing_step", f"final answer after {done} of {n} operations")
                given = answer[1].strip()
                if not _INT.match(given) or int(given) != value:
                    return StepCheck(k, "final_answer", f"answer {given!r}, the last step's result is {value}")
                answered = True
        if not answered:
            return StepCheck(len(steps) - 1, "missing_step",
                             f"the response ends after {done} of {n} operations" + (" without a final answer" if done == n else ""))
        return StepCheck(-1)

    def verify(self, response: str, gold: str) -> Verdict:
        extracted = self.extract_answer(response)
        if extracted is None:
            return Verdict(False, VerifyStatus.NO_ANSWER, None, "no \\boxed{} answer")
        if not _INT.match(gold.strip()):
            return Verdict(False, VerifyStatus.ERROR, extracted, f"gold {gold!r} is not an integer")
        if not _INT.match(extracted):
            return Verdict(False, VerifyStatus.OK, extracted, "answer is not an integer")
        return Verdict(int(extracted) == int(gold), VerifyStatus.OK, extracted)
