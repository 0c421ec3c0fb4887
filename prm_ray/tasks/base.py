"""The task interface: where instructions come from, how answers are extracted and verified.

A task is the only domain-specific piece of the pipeline. Rollouts, training and evaluation see
`Instruction` rows and `Verdict`s and nothing else, so a new domain is a new `Task` subclass.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


class VerifyStatus(str, enum.Enum):
    """How verification ended. Only `OK` verdicts carry a meaningful `correct` flag of True.

    A timeout or a parse failure is never folded into a silent `correct=False`: the row keeps the
    reason, so a broken verifier shows up in the rollout summary instead of as a low pass rate.
    """

    OK = "ok"  # the answer was extracted and compared; `correct` says how it went
    NO_ANSWER = "no_answer"  # the response has no final answer (no \boxed{...})
    TIMEOUT = "timeout"  # the comparison did not finish within the deadline
    ERROR = "error"  # the comparison raised (e.g. the gold answer does not parse)


LABELLED = (VerifyStatus.OK.value, VerifyStatus.NO_ANSWER.value)
"""Statuses with a trustworthy outcome label: ``ok`` (label = ``correct``) and ``no_answer`` (0)."""
UNVERIFIABLE = (VerifyStatus.TIMEOUT.value, VerifyStatus.ERROR.value)
"""Statuses with no trustworthy label (the verifier hit its deadline or raised): never trained on."""


@dataclass(frozen=True)
class Verdict:
    correct: bool
    status: VerifyStatus
    extracted_answer: str | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.correct and self.status is not VerifyStatus.OK:
            raise ValueError(f"a verdict with status {self.status.value!r} cannot be correct")


@dataclass(frozen=True)
class StepCheck:
    """A response's steps judged against its problem (step-level ground truth).

    ``first_error`` is the index of the first wrong step among the steps given to
    :meth:`Task.check_steps` (-1: none), ``kind`` its error kind (one of the task's
    ``ERROR_KINDS``; None when there is no error), ``detail`` says what was expected there.
    """

    first_error: int
    kind: str | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if (self.first_error < 0) != (self.kind is None):
            raise ValueError(f"a StepCheck names a kind exactly when it has an error, got {self}")


@dataclass(frozen=True)
class Instruction:
    """One problem. `prompt` is the raw problem text; chat templates are applied later, per model."""

    id: str
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


class Task(abc.ABC):
    """An instruction source plus answer extraction plus verification."""

    name: str = "task"
    group_timeouts: int = 0  # answer comparisons in answer_groups that hit a deadline (so far)

    @abc.abstractmethod
    def instructions(self, split: str, limit: int | None = None) -> Iterator[Instruction]:
        """Yield the instructions of a split, in a deterministic order."""

    @abc.abstractmethod
    def extract_answer(self, response: str) -> str | None:
        """The final answer a response commits to, or None if it gives none."""

    @abc.abstractmethod
    def verify(self, response: str, gold: str) -> Verdict:
        """Judge one response against the gold answer."""

    def verify_batch(self, responses: Sequence[str], golds: Sequence[str]) -> list[Verdict]:
        """Judge many responses; tasks with expensive verifiers override this to parallelise."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        return [self.verify(r, g) for r, g in zip(responses, golds)]

    def format_instruction(self, instruction: Instruction) -> str:
        """The user-turn text the policy sees (before its chat template)."""
        return instruction.prompt

    ERROR_KINDS: tuple[str, ...] = ()
    """The kinds of step error :meth:`check_steps` can name (empty: the task has no step checker)."""

    def check_steps(self, problem: str, steps: Sequence[str]) -> StepCheck:
        """Judge each step of a response to ``problem`` (the user turn it answered), split into
        ``steps`` exactly as a PRM splits it; only tasks whose every step can be checked exactly
        implement this (:attr:`ERROR_KINDS` non-empty)."""
        raise NotImplementedError(f"task {self.name!r} has no step checker; step-level ground truth needs labelled "
                                  "steps (ProcessBench-format data, docs/step-eval.md)")

    def answer_groups(self, problems: Sequence[tuple[Sequence[Verdict], str]]) -> list[list[str | None]]:
        """For each problem (its samples' verdicts and its gold answer), the key each sample votes
        under: samples with equal keys gave the same answer, None gives no vote. Majority and
        weighted voting count keys, not spellings. Default: the extracted answer string itself."""
        return [[v.extracted_answer for v in verdicts] for verdicts, _ in problems]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None if absent.

    Same convention as the paper's evaluation code: the last box wins, nested braces are kept.
    """
    best = None
    for marker in ("\\boxed", "\\fbox"):
        idx = text.rfind(marker)
        if idx > (best[0] if best else -1):
            best = (idx, marker)
    if best is None:
        return None
    idx, marker = best
    i = idx + len(marker)
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        # `\boxed 5` (no braces) is legal LaTeX; take the next token.
        rest = text[i:].strip().split()
        return rest[0].rstrip("$.") if rest else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the response was cut off inside the box
