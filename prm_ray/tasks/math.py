"""The `math` task: MATH-style problems with LaTeX answers, verified with math-verify.

Data: a JSONL or Parquet file with `problem` and `answer` per row (optional `unique_id`, `subject`,
`level`, `solution`). Without a path the task serves the shipped MATH-500 test split
(`prm_ray/data/math500.jsonl`, see `prm_ray/data/README.md`), whose only split is "test". A file
given by path IS one split: whatever split name is asked for, the whole file is served, so the
same config works for `--split train` on a train file and `--split test` on a test file.

Verification: the final answer is the last `\\boxed{}` (or, failing that, the text after the last
"The answer is"), compared with the gold by math-verify. math-verify's own timeouts use
`signal.alarm`, which raises outside a process's main thread (Ray actors, threads); they are
disabled here (`parsing_timeout=None`, `timeout_seconds=None`) and the deadline is enforced by a
`DeadlinePool` of worker processes instead, where a hung sympy call is killed and reported as
`VerifyStatus.TIMEOUT`. Failures are never folded into `correct=False`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from prm_ray.tasks.base import Instruction, Task, Verdict, VerifyStatus, last_boxed
from prm_ray.tasks.deadline_pool import DeadlinePool, JobResult, JobStatus

DEFAULT_PROMPT_SUFFIX = (
    "\n\nPlease reason step by step, separating steps with a blank line, "
    "and put your final answer within \\boxed{}."
)
SHIPPED_DATA = Path(__file__).resolve().parent.parent / "data" / "math500.jsonl"
SHIPPED_SPLITS = ("test",)
# Fields that become Instruction attributes rather than meta. The reference solution is left out
# of meta on purpose: it is long and contains the answer, and meta travels with every rollout.
_NOT_META = ("problem", "answer", "unique_id", "solution")
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)


# ---- worker side: module-level so they pickle by reference into DeadlinePool workers ----------

class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeout is off; that is deliberate here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


def warm_up() -> None:
    """Worker initializer: import math-verify and run one comparison before taking jobs, so
    imports and first-call set-up (~1 s) never count against a job's deadline."""
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
    correct, _ = verify_answer("\\frac{1}{2}", "0.5")
    if not correct:
        raise RuntimeError("math-verify self-check failed: 1/2 != 0.5")


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple[Any, ...]:
    """Parsed gold (cached: a problem's gold is compared with many sampled responses)."""
    # math-verify and sympy load in the verification worker processes only (seconds of imports).
    from math_verify import parse
    from sympy import Basic, MatrixBase

    # `$...$` makes math-verify read the gold as LaTeX (as the reference grader does); every
    # MATH-500 gold parses this way.
    parsed = parse("$" + gold + "$", parsing_timeout=None, raise_on_error=True)
    if not any(isinstance(p, (Basic, MatrixBase)) for p in parsed):
        # Only a raw-string fallback (or nothing) came back: a comparison would be a plain string
        # match, which would mark every differently-written correct answer wrong.
        raise ValueError(f"gold answer does not parse as math: {gold!r} -> {parsed!r}")
    return tuple(parsed)


def verify_answer(gold: str, pred: str) -> tuple[bool, str]:
    """`(correct, detail)` for an extracted answer; raises when the comparison itself fails.

    Runs inside a pool worker. Every (gold, prediction) parse pair is tried (what
    `math_verify.verify` does for lists), but with `raise_on_error=True` per pair: a pair that
    raises does not hide a later pair that matches, and if nothing matches the error surfaces
    instead of becoming a silent False.
    """
    from math_verify import parse, verify  # in the worker processes only (see _parse_gold)

    gold_parsed = _parse_gold(gold)
    # `\boxed{...}` makes math-verify take the whole answer as LaTeX.
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=None, raise_on_error=True)
    if not pred_parsed:
        return False, "the answer does not parse"
    errors: list[Exception] = []
    for g in gold_parsed:
        for p in pred_parsed:
            try:
                if verify(g, p, timeout_seconds=None, raise_on_error=True):
                    return True, ""
            except Exception as exc:  # noqa: BLE001 - re-raised below if nothing matched
                errors.append(exc)
    if errors:
        raise errors[0]
    return False, ""


# ---- driver side --------------------------------------------------------------------------------

def _normalise(answer: str) -> str:
    return " ".join(answer.replace("$", "").split())


def _read_rows(path: Path) -> Iterator[tuple[int, str, dict[str, Any] | str]]:
    """Yield `(row_index, location, row)`; `row` is an error message when the row is unreadable.

    `location` names the row for error messages: "line N" (1-based) for JSONL, "row N"
    (0-based) for Parquet.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read math data file {path}: {exc}") from exc
        index = 0
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) carry no row
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                row = f"invalid JSON ({exc.msg} at column {exc.colno})"
            if not isinstance(row, (dict, str)):
                row = f"expected a JSON object, got {type(row).__name__}"
            yield index, f"line {lineno}", row
            index += 1
    elif suffix == ".parquet":
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
            raise ValueError(f"cannot read math data file {path}: {exc}") from exc
        for index, row in enumerate(rows):
            yield index, f"row {index}", row
    else:
        raise ValueError(f"math data file {path}: unsupported format {suffix!r} "
                         "(expected .jsonl or .parquet)")


def _check_row(row: dict[str, Any]) -> str | None:
    """Why a row is unusable, naming the field; None if it is fine."""
    for key in ("problem", "answer"):
        if key not in row or row[key] is None:
            return f"field {key!r} is missing"
        if not isinstance(row[key], str):
            return f"field {key!r} must be a string, got {type(row[key]).__name__}"
        if not row[key].strip():
            return f"field {key!r} is empty"
    uid = row.get("unique_id")
    if uid is not None and (not isinstance(uid, str) or not uid.strip()):
        return "field 'unique_id' must be a non-empty string when present"
    return None


class MathTask(Task):
    """MATH-style problems from a JSONL/Parquet file (default: the shipped MATH-500 test split).

    Verification runs in `num_workers` worker processes started on first use (so a task that only
    serves instructions never starts any). Call `close()` or use the task as a context manager to
    stop them early; otherwise they stop when the task is garbage-collected or at exit. A pickled
    task (e.g. sent to a Ray actor) leaves its pool behind and starts its own where it lands.
    """

    name = "math"

    def __init__(
        self,
        path: str | Path | None = None,
        timeout_s: float = 5.0,
        num_workers: int = 1,
        prompt_suffix: str = DEFAULT_PROMPT_SUFFIX,
        on_bad_row: Literal["error", "skip"] = "error",
        memory_limit_mb: int | None = 2048,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        self.path = Path(path) if path is not None else SHIPPED_DATA
        self.shipped = path is None
        self.timeout_s = float(timeout_s)
        self.num_workers = int(num_workers)
        self.prompt_suffix = prompt_suffix
        self.on_bad_row = on_bad_row
        # Per worker address-space cap: a runaway sympy computation fails with MemoryError
        # (status ERROR) before it can take the machine down. A worker uses ~100 MB normally.
        self.memory_limit_mb = memory_limit_mb
        # (location, reason) of every row left out under on_bad_row="skip"
        self.skipped_rows: list[tuple[str, str]] = []
        self.group_timeouts = 0  # answer comparisons of answer_groups that hit the deadline
        self._pool: DeadlinePool | None = None
        self._pool_lock = threading.Lock()  # two threads' first verify must not start two pools
        self._instructions = self._load()

    # -- data -------------------------------------------------------------------------------
    def _load(self) -> list[Instruction]:
        if not self.path.is_file():
            what = "is not a file" if self.path.exists() else "does not exist"
            raise FileNotFoundError(f"math data file {self.path} {what}")
        stem = self.path.stem
        out: list[Instruction] = []
        seen: set[str] = set()
        for index, where, row in _read_rows(self.path):
            reason = row if isinstance(row, str) else _check_row(row)
            if reason is None:
                inst_id = row.get("unique_id") or f"{stem}-{index}"
                if inst_id in seen:
                    reason = f"duplicate id {inst_id!r}"
            if reason is not None:
                if self.on_bad_row == "error":
                    raise ValueError(f"math data file {self.path}, {where}: {reason} "
                                     "(pass on_bad_row='skip' to skip bad rows)")
                self.skipped_rows.append((where, reason))
                continue
            seen.add(inst_id)
            meta = {k: v for k, v in row.items() if k not in _NOT_META}
            out.append(Instruction(id=inst_id, prompt=row["problem"], answer=row["answer"],
                                   meta=meta))
        return out

    def splits(self) -> tuple[str, ...] | None:
        """The valid split names, or None when any name is accepted (a user file is one split)."""
        return SHIPPED_SPLITS if self.shipped else None

    def instructions(self, split: str, limit: int | None = None) -> Iterator[Instruction]:
        """File order. For the shipped data only "test" exists; a user file serves any split."""
        if self.shipped and split not in SHIPPED_SPLITS:
            raise ValueError(f"the shipped MATH-500 data has no split {split!r}; valid splits: "
                             f"{', '.join(SHIPPED_SPLITS)} (pass a path for other data)")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        rows = self._instructions if limit is None else self._instructions[:limit]
        return iter(rows)

    def format_instruction(self, instruction: Instruction) -> str:
        return instruction.prompt + self.prompt_suffix

    # -- answers ----------------------------------------------------------------------------
    def extract_answer(self, response: str) -> str | None:
        """The last `\\boxed{}`; else what follows the last "The answer is" on its line."""
        boxed = last_boxed(response)
        if boxed is not None:
            return boxed.strip() or None
        matches = list(_ANSWER_IS.finditer(response))
        if not matches:
            return None
        tail = response[matches[-1].end():].split("\n", 1)[0]
        # "The answer is: $42$." -> "42"; a leading "." is kept (".5" is a number).
        answer = tail.strip().lstrip(":").strip().strip("$").rstrip(" .$").strip()
        return answer or None

    @property
    def pool(self) -> DeadlinePool:
        """The verification workers, started on first use."""
        with self._pool_lock:
            if self._pool is None or self._pool.closed:
                self._pool = DeadlinePool(self.num_workers, initializer=warm_up,
                                          memory_limit_mb=self.memory_limit_mb)
            return self._pool

    def verify(self, response: str, gold: str) -> Verdict:
        return self.verify_batch([response], [gold])[0]

    def verify_batch(self, responses: Sequence[str], golds: Sequence[str]) -> list[Verdict]:
        """Verdicts in input order; math-verify jobs run in parallel on the pool's workers."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        verdicts: list[Verdict | None] = [None] * len(responses)
        # Best-of-N samples often repeat an answer: each distinct (gold, answer) is checked once.
        jobs: dict[tuple[str, str], list[int]] = {}
        for i, (response, gold) in enumerate(zip(responses, golds)):
            pred = self.extract_answer(response)
            if pred is None:
                verdicts[i] = Verdict(False, VerifyStatus.NO_ANSWER, None,
                                      "no \\boxed{} answer and no 'The answer is'")
            elif _normalise(pred) == _normalise(gold):
                verdicts[i] = Verdict(True, VerifyStatus.OK, pred, "exact match")
            else:
                jobs.setdefault((gold, pred), []).append(i)
        if jobs:
            results = self.pool.map(verify_answer, list(jobs), self.timeout_s)
            for ((_, pred), rows), res in zip(jobs.items(), results):
                for i in rows:
                    verdicts[i] = self._verdict(res, pred)
        return verdicts  # type: ignore[return-value]  # every slot is filled

    def answer_groups(self, problems: Sequence[tuple[Sequence[Verdict], str]]) -> list[list[str | None]]:
        """Vote keys by answer equivalence, not spelling (``\\frac12``, ``0.5``, ``\\dfrac{1}{2}``
        vote together). A correct answer votes as the gold answer (the released eval maps correct
        answers to the gold too); the other answers, after whitespace and ``$`` normalisation, are
        compared pairwise with math-verify under the verification deadline and merged when equal
        (transitively: union-find), each group keyed by its first-seen member. A comparison that
        times out or raises (an answer that is not math) leaves the two apart; timeouts are counted
        in :attr:`group_timeouts`."""
        keys: list[list[str | None]] = []
        pairs: list[tuple[int, int, int]] = []  # (problem, i, j): distinct keys to compare
        distinct: list[list[str]] = []
        for p, (verdicts, gold) in enumerate(problems):
            row = [None if v.extracted_answer is None else gold if v.correct else _normalise(v.extracted_answer)
                   for v in verdicts]
            keys.append(row)
            wrong = list(dict.fromkeys(k for k, v in zip(row, verdicts) if k is not None and not v.correct))
            distinct.append(wrong)
            pairs += [(p, i, j) for i in range(len(wrong)) for j in range(i + 1, len(wrong))]
        if not pairs:
            return keys
        # The earlier answer is read like a gold answer (raises when it is not math: kept apart).
        results = self.pool.map(verify_answer, [(distinct[p][i], distinct[p][j]) for p, i, j in pairs],
                                self.timeout_s)
        parent = {(p, i): (p, i) for p, d in enumerate(distinct) for i in range(len(d))}

        def root(x):
            while parent[x] != x:
                x = parent[x]
            return x

        for (p, i, j), res in zip(pairs, results):
            if res.status is JobStatus.TIMEOUT:
                self.group_timeouts += 1
            elif res.status is JobStatus.OK and res.value[0]:
                a, b = root((p, i)), root((p, j))
                parent[max(a, b)] = min(a, b)  # the earlier-seen answer names the group
        for p, row in enumerate(keys):
            name = {k: distinct[p][root((p, i))[1]] for i, k in enumerate(distinct[p])}
            keys[p] = [name.get(k, k) for k in row]  # None and the gold stay as they are
        return keys

    def _verdict(self, res: JobResult, pred: str) -> Verdict:
        if res.status is JobStatus.OK:
            correct, detail = res.value
            return Verdict(bool(correct), VerifyStatus.OK, pred, detail)
        if res.status is JobStatus.TIMEOUT:
            return Verdict(False, VerifyStatus.TIMEOUT, pred,
                           f"math-verify did not finish within {self.timeout_s:g}s")
        return Verdict(False, VerifyStatus.ERROR, pred, res.error)

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the verification workers (idempotent; they restart on the next verify)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def __enter__(self) -> MathTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pool"] = None  # processes do not travel; the receiver starts its own
        del state["_pool_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pool_lock = threading.Lock()
