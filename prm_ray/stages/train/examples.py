"""Training examples for an implicit PRM, built from a rollout Parquet dataset (docs/rollouts.md).

Pure pyarrow + Python (no Ray; tokenizers through :mod:`prm_ray.tokens`), so it runs anywhere: in a driver, in a Ray Data task, or in a test. The small per-row columns (instruction id, sample index, correct, verify status) are
pulled into Python to decide *which* rows survive; the text columns (prompt, response) are never
copied into Python, they are gathered with ``Table.take``.

What a row means depends on the objective (see :data:`prm_ray.core.objectives.OBJECTIVES`):

* unpaired (``ce``, ``kto``): one row per response with a 0/1 outcome label, as the paper's CE
  run flattens its 8 rollouts per prompt. KTO rows also carry a *mismatched* completion
  (``kl_response``, from a different instruction) for KTO's KL reference point, as TRL pairs each
  prompt with another row's completion.
* paired (``dpo``, ``nca``): one row per (correct, incorrect) pair of responses to the same
  instruction; instructions whose responses are all right or all wrong give no pair and are
  dropped, which is why DPO starves at 1-2 responses per instruction (paper Fig. 5).

Every row that is removed is counted in the report under its reason; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from prm_ray.artifacts import check_columns, load_rollouts
from prm_ray.config import ConfigError, param
from prm_ray.core.objectives import OBJECTIVES, get_objective
from prm_ray.tasks import LABELLED, UNVERIFIABLE
from prm_ray.tokens import TOKEN_NAMES, encode_table, splice_prompts

__all__ = [
    "BALANCE_MODES",
    "DatasetConfig",
    "LABEL_TYPE",
    "REQUIRED_COLUMNS",
    "RESPONSE_KEYS",
    "attach_tokens",
    "build_examples",
    "describe",
    "output_schema",
    "selected_rows",
    "tokenize_examples",
]

BALANCE_MODES = ("none", "dataset", "instruction")

REQUIRED_COLUMNS = ("instruction_id", "prompt", "response", "sample_index", "correct", "verify_status")
"""Rollout columns this module reads; the others (gold answer, token counts, ...) are not needed."""

LABEL_TYPE = pa.int8()
"""``label`` is int8 0/1 (1 = correct): casts straight to a float tensor for BCE, sums to counts."""

_UNPAIRED_FIELDS = [
    ("instruction_id", pa.string()),
    ("prompt", pa.string()),
    ("response", pa.string()),
    ("sample_index", pa.int32()),
    ("label", LABEL_TYPE),
]
_STEP_FIELDS = [
    ("step_labels", pa.list_(pa.float32())),  # one label in [0, 1] per step of `response`
]
_KTO_FIELDS = [
    ("kl_instruction_id", pa.string()),  # where kl_response comes from (always != instruction_id)
    ("kl_sample_index", pa.int32()),
    ("kl_response", pa.string()),  # a completion of a DIFFERENT instruction, for KTO's z_ref
]
_PAIRED_FIELDS = [
    ("instruction_id", pa.string()),
    ("prompt", pa.string()),
    ("chosen", pa.string()),  # a correct response
    ("rejected", pa.string()),  # an incorrect response (wrong answer or no answer)
    ("chosen_index", pa.int32()),  # sample_index of `chosen`
    ("rejected_index", pa.int32()),  # sample_index of `rejected`
]

RESPONSE_KEYS = {
    "response": ("instruction_id", "sample_index"),
    "chosen": ("instruction_id", "chosen_index"),
    "rejected": ("instruction_id", "rejected_index"),
    "kl_response": ("kl_instruction_id", "kl_sample_index"),
}
"""Each text column of the examples a model reads, and the rollout row it came from. Its tokens are
the columns ``<text column>_<field>`` for every field of :data:`prm_ray.tokens.TOKEN_FIELDS`.
``kl_response`` is read after the example's own prompt (``instruction_id``, ``sample_index``), not
after its own instruction's."""

INSTRUCTION_DROP_REASONS = ("all_unverifiable", "not_sampled", "all_correct", "all_incorrect",
                            "balanced_away")
ROW_DROP_REASONS = ("unverifiable", "not_sampled", "beyond_first_k", "all_correct", "all_incorrect",
                    "balancing", "not_in_sampled_pairs")


def output_schema(objective: str) -> pa.Schema:
    """The schema :func:`build_examples` returns for ``objective`` (also for an empty result)."""
    obj = get_objective(objective)
    if obj.paired:
        return pa.schema(_PAIRED_FIELDS)
    extra = _KTO_FIELDS if obj.needs_reference_point else _STEP_FIELDS if obj.explicit else []
    return pa.schema(_UNPAIRED_FIELDS + extra)


@dataclass
class DatasetConfig:
    """How to turn rollouts into training examples (paper section 4.1 and the section 5.1 scaling study)."""

    objective: str = param("ce", "ce | kto (unpaired rows) | dpo | nca (correct x incorrect pairs) | "
                                 "math-shepherd-hard | math-shepherd-soft (explicit PRM on step labels)")
    responses_per_instruction: int | None = param(None, "first k verifiable responses by sample_index; null: all")
    instruction_fraction: float = param(1.0, "seeded random fraction of instructions, 0 < f <= 1")
    balance: str = param("none", "none | dataset | instruction (Table 1's CE rows); unpaired objectives only")
    max_pairs_per_instruction: int | None = param(None, "dpo/nca: a seeded sample of at most k pairs per "
                                                        "instruction; null: every pair")
    seed: int = param(0, "seed of every sampling choice above")

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(sorted(OBJECTIVES))}, "
                              f"got {self.objective!r}")
        obj = get_objective(self.objective)
        k = self.responses_per_instruction
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"responses_per_instruction must be an integer >= 1 or null (all), got {k!r}")
        f = self.instruction_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ConfigError(f"instruction_fraction must be a number in (0, 1], got {f!r}")
        if self.balance not in BALANCE_MODES:
            raise ConfigError(f"balance must be one of {', '.join(BALANCE_MODES)}, got {self.balance!r}")
        if obj.explicit and self.balance != "none":
            raise ConfigError(f"balance={self.balance!r} applies to outcome labels; {self.objective} trains on "
                              "step labels, use balance='none'")
        if obj.paired and self.balance != "none":
            raise ConfigError(f"balance={self.balance!r} only applies to unpaired objectives (ce, kto); "
                              f"{self.objective} pairs are balanced by construction, use balance='none'")
        m = self.max_pairs_per_instruction
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ConfigError(f"max_pairs_per_instruction must be an integer >= 1 or null (all), got {m!r}")
            if not obj.paired:
                raise ConfigError(f"max_pairs_per_instruction only applies to paired objectives (dpo, nca), "
                                  f"not {self.objective}; leave it null")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _rng(seed: int, *purpose: Any) -> random.Random:
    """An independent, stable random stream per purpose: seeding with a string hashes it (sha512),
    so e.g. one instruction's pair sample does not depend on which other instructions are kept."""
    return random.Random(":".join(str(p) for p in (seed, *purpose)))


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def build_examples(rollouts: str | Path | pa.Table, cfg: DatasetConfig) -> tuple[pa.Table, dict]:
    """Build the training table for ``cfg.objective`` from rollouts; return ``(table, report)``.

    Steps, in this order:

    1. **Labels and exclusion.** ``correct`` -> label 1; ``verify_status == "ok"`` and not correct,
       or ``"no_answer"`` (no final answer is a wrong answer) -> label 0. ``timeout`` / ``error``
       rows have no trustworthy label and are excluded (``excluded_unverifiable``).
       Unknown statuses, nulls, ``correct`` with a status other than ``ok``, duplicate
       ``(instruction_id, sample_index)`` and one instruction with two prompts raise ValueError.
    2. **Instruction fraction.** ``f * n`` rounded half up (at least 1) of the ``n`` instructions left,
       drawn with the seed from their *sorted* ids, so the choice is stable for a seed.
    3. **First k responses** per instruction by ``sample_index`` (among the verifiable ones: an
       excluded sample does not use up one of the k).
    4. **Objective-specific rows.** ce/kto: one row per response. dpo/nca: every correct x incorrect
       pair of an instruction, or a seeded sample of ``max_pairs_per_instruction`` of them;
       instructions with no correct or no incorrect response are dropped (``all_incorrect`` /
       ``all_correct``). With 1 response per instruction there are no pairs: an empty table with
       the right schema is returned and ``report["notes"]`` says why (no exception).
    5. **Balancing** (ce/kto only). ``dataset``: a seeded sample of the majority class over the
       whole dataset, down to the minority count. ``instruction``: the same within each instruction;
       instructions with a single class are dropped (``all_correct`` / ``all_incorrect``).
    6. **KTO mismatched completions** (after balancing, so they come from the rows trained on).

    Output order: sorted by ``instruction_id`` then ``sample_index`` (pairs: then ``chosen_index``,
    ``rejected_index``); not shuffled, the trainer shuffles. Same input + config -> identical output
    (the input row order does not matter).

    Columns: see :func:`output_schema`. Report: JSON-serialisable counts; every removed row and
    instruction is counted under one reason in ``rows_dropped`` / ``instructions_dropped``, so
    ``input_rows == sum(rows_dropped) + positives + negatives`` and
    ``input_instructions == sum(instructions_dropped) + instructions_used``.
    """
    step_col = get_objective(cfg.objective).step_labels
    required = list(REQUIRED_COLUMNS) + ([step_col] if step_col else [])
    try:
        if isinstance(rollouts, pa.Table):
            check_columns(rollouts.schema.names, required, "table")
            table = rollouts.select(required)
            source = "table"
        else:
            table = load_rollouts(rollouts, columns=required)
            source = str(rollouts)
    except ValueError as exc:
        if step_col and step_col in str(exc):
            raise ValueError(f"{exc}. Objective {cfg.objective} trains on step labels: give it the output of "
                             "the Math-Shepherd labelling (jobs/label_steps.py), not plain rollouts") from None
        raise
    table = table.combine_chunks()
    paired = get_objective(cfg.objective).paired

    iids = [None if v is None else str(v) for v in table.column("instruction_id").to_pylist()]
    sidx = table.column("sample_index").to_pylist()
    correct = table.column("correct").to_pylist()
    status = table.column("verify_status").to_pylist()
    _validate_rows(table, iids, sidx, correct, status)
    if step_col:
        _validate_step_labels(table.column(step_col).to_pylist(), iids, sidx, step_col)

    rows_dropped = dict.fromkeys(ROW_DROP_REASONS, 0)
    inst_dropped = dict.fromkeys(INSTRUCTION_DROP_REASONS, 0)
    notes: list[str] = []
    report: dict[str, Any] = {
        "objective": cfg.objective,
        "source": source,
        "input_rows": table.num_rows,
        "input_instructions": len(set(iids)),
    }

    by_inst, counts = _select(iids, sidx, status, cfg)
    report["excluded_unverifiable"] = counts["excluded_unverifiable"]
    report["excluded_by_status"] = counts["excluded_by_status"]
    for reason in ("unverifiable", "not_sampled", "beyond_first_k"):
        rows_dropped[reason] = counts["rows_dropped"][reason]
    for reason in ("all_unverifiable", "not_sampled"):
        inst_dropped[reason] = counts["instructions_dropped"][reason]
    report["instructions_after_fraction"] = counts["instructions_after_fraction"]
    ids = sorted(by_inst)
    k = cfg.responses_per_instruction
    label = [1 if correct[i] else 0 for i in range(table.num_rows)]  # only read for kept rows
    report["rows_after_first_k"] = sum(len(by_inst[iid]) for iid in ids)
    report["positives_after_first_k"] = sum(label[i] for iid in ids for i in by_inst[iid])
    report["negatives_after_first_k"] = report["rows_after_first_k"] - report["positives_after_first_k"]

    # 4./5. objective-specific construction (+ balancing)
    if paired:
        out, used, pos, neg = _build_pairs(table, ids, by_inst, label, sidx, cfg, rows_dropped, inst_dropped)
        report["pairs"] = out.num_rows
        report["dropped_by_balancing"] = 0
        if out.num_rows == 0:
            if k == 1:
                notes.append(f"no pairs: with responses_per_instruction=1 no instruction has both a correct "
                             f"and an incorrect response, so {cfg.objective} is not defined for this setting")
            else:
                notes.append(f"no pairs: no instruction has both a correct and an incorrect response "
                             f"({inst_dropped['all_correct']} all correct, "
                             f"{inst_dropped['all_incorrect']} all incorrect)")
    else:
        rows_by_inst, dropped_by_balancing = _balance(ids, by_inst, label, cfg, rows_dropped, inst_dropped,
                                                      notes)
        used = [iid for iid in ids if rows_by_inst.get(iid)]
        flat = [i for iid in used for i in rows_by_inst[iid]]
        out = _unpaired_table(table, flat, rows_by_inst, used, label, sidx, cfg)
        pos = sum(label[i] for i in flat)
        neg = len(flat) - pos
        report["dropped_by_balancing"] = dropped_by_balancing
        if not flat:
            notes.append("no rows left")

    report["instructions_used"] = len(used)
    report["instructions_dropped"] = inst_dropped
    report["rows_dropped"] = rows_dropped
    report["rows"] = out.num_rows
    report["positives"] = pos
    report["negatives"] = neg
    report["columns"] = out.schema.names
    report["notes"] = notes
    report["config"] = dataclasses.asdict(cfg)
    return out, report


def _validate_rows(table: pa.Table, iids: list, sidx: list, correct: list, status: list) -> None:
    def first(pred) -> int | None:
        return next((i for i in range(len(iids)) if pred(i)), None)

    for name, values in (("instruction_id", iids), ("sample_index", sidx), ("verify_status", status)):
        bad = first(lambda i, values=values: values[i] is None)
        if bad is not None:
            raise ValueError(f"rollout row {bad} has a null {name}")
    for name in ("prompt", "response"):
        if table.column(name).null_count:
            raise ValueError(f"rollout data has {table.column(name).null_count} null {name}(s)")
    allowed = LABELLED + UNVERIFIABLE
    bad = first(lambda i: status[i] not in allowed)
    if bad is not None:
        raise ValueError(f"rollout row {bad} ({iids[bad]}, sample {sidx[bad]}) has unknown verify_status "
                         f"{status[bad]!r}; expected one of {', '.join(allowed)}")
    bad = first(lambda i: status[i] == "ok" and correct[i] is None)
    if bad is not None:
        raise ValueError(f"rollout row {bad} ({iids[bad]}, sample {sidx[bad]}) has verify_status 'ok' "
                         f"but a null 'correct'")
    bad = first(lambda i: correct[i] and status[i] != "ok")
    if bad is not None:
        raise ValueError(f"rollout row {bad} ({iids[bad]}, sample {sidx[bad]}) is marked correct with "
                         f"verify_status {status[bad]!r}; correct requires 'ok'")
    seen: set[tuple[str, int]] = set()
    for i in range(len(iids)):
        key = (iids[i], sidx[i])
        if key in seen:
            raise ValueError(f"duplicate response: instruction {key[0]!r} sample_index {key[1]} appears more "
                             f"than once (two rollout runs mixed in one directory?)")
        seen.add(key)
    if table.num_rows:
        per = table.group_by("instruction_id").aggregate([("prompt", "count_distinct")])
        counts = per.column("prompt_count_distinct").to_pylist()
        if max(counts) > 1:
            bad = counts.index(max(counts))
            raise ValueError(f"instruction {per.column('instruction_id')[bad].as_py()!r} has "
                             f"{counts[bad]} different prompts; expected one prompt per instruction")


def _select(iids: list, sidx: list, status: list, cfg: DatasetConfig) -> tuple[dict[str, list[int]], dict]:
    """Steps 1-3 of :func:`build_examples`: verifiable rows, the instruction fraction, the first k.

    Returns the kept row indices per instruction (sorted by ``sample_index``) and the counts of
    what was removed.
    """
    status_counts = Counter(status)
    keep = [i for i in range(len(iids)) if status[i] in LABELLED]
    by_inst: dict[str, list[int]] = {}
    for i in keep:
        by_inst.setdefault(iids[i], []).append(i)
    rows_dropped = {"unverifiable": len(iids) - len(keep), "not_sampled": 0, "beyond_first_k": 0}
    inst_dropped = {"all_unverifiable": len(set(iids)) - len(by_inst), "not_sampled": 0}
    ids = sorted(by_inst)
    if cfg.instruction_fraction < 1 and ids:
        n_keep = min(len(ids), max(1, int(cfg.instruction_fraction * len(ids) + 0.5)))
        chosen = set(_rng(cfg.seed, "instruction_fraction").sample(ids, n_keep))
        for iid in ids:
            if iid not in chosen:
                rows_dropped["not_sampled"] += len(by_inst.pop(iid))
        inst_dropped["not_sampled"] = len(ids) - n_keep
    k = cfg.responses_per_instruction
    for iid in sorted(by_inst):
        rows = sorted(by_inst[iid], key=lambda i: sidx[i])
        if k is not None and len(rows) > k:
            rows_dropped["beyond_first_k"] += len(rows) - k
            rows = rows[:k]
        by_inst[iid] = rows
    return by_inst, {"excluded_unverifiable": rows_dropped["unverifiable"],
                     "excluded_by_status": {s: status_counts.get(s, 0) for s in UNVERIFIABLE},
                     "rows_dropped": rows_dropped, "instructions_dropped": inst_dropped,
                     "instructions_after_fraction": len(by_inst)}


def selected_rows(rollouts: pa.Table, cfg: DatasetConfig) -> list[int]:
    """Indices of the rollout rows :func:`build_examples` builds ``cfg``'s examples from (after
    excluding unverifiable rows, taking the instruction fraction and the first k responses): the
    responses a PRM's training data cost to generate."""
    iids = [None if v is None else str(v) for v in rollouts.column("instruction_id").to_pylist()]
    by_inst, _ = _select(iids, rollouts.column("sample_index").to_pylist(),
                         rollouts.column("verify_status").to_pylist(), cfg)
    return sorted(i for rows in by_inst.values() for i in rows)


def _validate_step_labels(labels: list, iids: list, sidx: list, column: str) -> None:
    for i, row in enumerate(labels):
        if not row or any(v is None or not 0.0 <= v <= 1.0 for v in row):
            raise ValueError(f"row {i} ({iids[i]}, sample {sidx[i]}): {column} must be a non-empty list of "
                             f"numbers in [0, 1], got {row!r}")


def _build_pairs(table, ids, by_inst, label, sidx, cfg, rows_dropped, inst_dropped):
    chosen_rows: list[int] = []
    rejected_rows: list[int] = []
    used: list[str] = []
    for iid in ids:
        rows = by_inst[iid]
        good = [i for i in rows if label[i] == 1]
        bad = [i for i in rows if label[i] == 0]
        if not bad:
            inst_dropped["all_correct"] += 1
            rows_dropped["all_correct"] += len(rows)
            continue
        if not good:
            inst_dropped["all_incorrect"] += 1
            rows_dropped["all_incorrect"] += len(rows)
            continue
        pairs = [(c, r) for c in good for r in bad]  # sorted by (chosen, rejected) sample_index
        m = cfg.max_pairs_per_instruction
        if m is not None and len(pairs) > m:
            picked = set(_rng(cfg.seed, "pairs", iid).sample(range(len(pairs)), m))
            pairs = [p for j, p in enumerate(pairs) if j in picked]
        in_pairs = {c for c, _ in pairs} | {r for _, r in pairs}
        rows_dropped["not_in_sampled_pairs"] += len(rows) - len(in_pairs)
        used.append(iid)
        chosen_rows.extend(c for c, _ in pairs)
        rejected_rows.extend(r for _, r in pairs)
    c_idx = pa.array(chosen_rows, pa.int64())
    r_idx = pa.array(rejected_rows, pa.int64())
    out = pa.table({
        "instruction_id": table.column("instruction_id").take(c_idx).cast(pa.string()),
        "prompt": table.column("prompt").take(c_idx).cast(pa.string()),
        "chosen": table.column("response").take(c_idx).cast(pa.string()),
        "rejected": table.column("response").take(r_idx).cast(pa.string()),
        "chosen_index": pa.array([sidx[i] for i in chosen_rows], pa.int32()),
        "rejected_index": pa.array([sidx[i] for i in rejected_rows], pa.int32()),
    }, schema=output_schema(cfg.objective))
    return out, used, len(set(chosen_rows)), len(set(rejected_rows))


def _balance(ids, by_inst, label, cfg, rows_dropped, inst_dropped, notes):
    """Apply ``cfg.balance``; return (rows per instruction, rows removed by balancing)."""
    rows_by_inst = {iid: list(by_inst[iid]) for iid in ids}
    if cfg.balance == "none":
        return rows_by_inst, 0
    removed = 0
    if cfg.balance == "dataset":
        flat = [i for iid in ids for i in rows_by_inst[iid]]  # sorted: (instruction, sample_index)
        pos = [i for i in flat if label[i] == 1]
        neg = [i for i in flat if label[i] == 0]
        major, minor = (pos, neg) if len(pos) >= len(neg) else (neg, pos)
        if not minor and major:
            notes.append(f"dataset-wise balancing removed every row: no "
                         f"{'incorrect' if major is pos else 'correct'} responses to balance against")
        keep = set(_rng(cfg.seed, "balance", "dataset").sample(major, len(minor))) | set(minor)
        for iid in ids:
            before = len(rows_by_inst[iid])
            rows_by_inst[iid] = [i for i in rows_by_inst[iid] if i in keep]
            removed += before - len(rows_by_inst[iid])
            if before and not rows_by_inst[iid]:
                inst_dropped["balanced_away"] += 1
        rows_dropped["balancing"] += removed
        return rows_by_inst, removed
    # instruction-wise
    for iid in ids:
        rows = rows_by_inst[iid]
        pos = [i for i in rows if label[i] == 1]
        neg = [i for i in rows if label[i] == 0]
        if not neg or not pos:
            reason = "all_correct" if not neg else "all_incorrect"
            inst_dropped[reason] += 1
            rows_dropped[reason] += len(rows)
            removed += len(rows)
            rows_by_inst[iid] = []
            continue
        major, minor = (pos, neg) if len(pos) >= len(neg) else (neg, pos)
        keep = set(_rng(cfg.seed, "balance", "instruction", iid).sample(major, len(minor))) | set(minor)
        rows_by_inst[iid] = [i for i in rows if i in keep]
        rows_dropped["balancing"] += len(rows) - len(keep)
        removed += len(rows) - len(keep)
    return rows_by_inst, removed


def _unpaired_table(table, flat, rows_by_inst, used, label, sidx, cfg) -> pa.Table:
    idx = pa.array(flat, pa.int64())
    cols = {
        "instruction_id": table.column("instruction_id").take(idx).cast(pa.string()),
        "prompt": table.column("prompt").take(idx).cast(pa.string()),
        "response": table.column("response").take(idx).cast(pa.string()),
        "sample_index": pa.array([sidx[i] for i in flat], pa.int32()),
        "label": pa.array([label[i] for i in flat], LABEL_TYPE),
    }
    obj = get_objective(cfg.objective)
    if obj.explicit:
        cols["step_labels"] = table.column(obj.step_labels).take(idx).cast(pa.list_(pa.float32()))
    if obj.needs_reference_point:
        kl = _kto_mismatched_rows(rows_by_inst, used, cfg.seed)
        kl_rows = [kl[i] for i in flat]
        kl_idx = pa.array(kl_rows, pa.int64())
        cols["kl_instruction_id"] = table.column("instruction_id").take(kl_idx).cast(pa.string())
        cols["kl_sample_index"] = pa.array([sidx[i] for i in kl_rows], pa.int32())
        cols["kl_response"] = table.column("response").take(kl_idx).cast(pa.string())
    return pa.table(cols, schema=output_schema(cfg.objective))


def _kto_mismatched_rows(rows_by_inst: dict[str, list[int]], used: list[str], seed: int) -> dict[int, int]:
    """Row -> the row whose response serves as its mismatched completion for KTO's KL estimate.

    The instructions are put in a seeded cyclic order and each one's responses in a seeded order;
    the j-th response of an instruction is paired with the (j mod size)-th response of the *next*
    instruction in the cycle. So the completion always belongs to a different instruction (given
    >= 2 instructions), and when all instructions have the same number of rows (the usual case:
    k responses each) every response is used exactly once, i.e. it is a permutation, like TRL's
    rotation of completions by one within a batch.
    """
    if not used:
        return {}
    if len(used) < 2:
        raise ValueError("KTO needs at least 2 instructions to pair a prompt with a mismatched completion "
                         f"for its KL reference point; only {used[0]!r} is left")
    rng = _rng(seed, "kto_kl")
    cycle = list(used)
    rng.shuffle(cycle)
    order = {}
    for iid in cycle:
        rows = list(rows_by_inst[iid])
        rng.shuffle(rows)
        order[iid] = rows
    out: dict[int, int] = {}
    for g, iid in enumerate(cycle):
        nxt = order[cycle[(g + 1) % len(cycle)]]
        for j, row in enumerate(order[iid]):
            out[row] = nxt[j % len(nxt)]
    return out


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _nonzero(d: dict[str, int]) -> str:
    parts = [f"{k} {v}" for k, v in d.items() if v]
    return ", ".join(parts) if parts else "none"


def describe(report: dict) -> str:
    """A one-paragraph human summary of a :func:`build_examples` report (for logs)."""
    cfg = report.get("config", {})
    paired = report["objective"] in OBJECTIVES and get_objective(report["objective"]).paired
    k = cfg.get("responses_per_instruction")
    parts = [
        f"{report['objective']} examples from {report['input_rows']} rollouts of "
        f"{report['input_instructions']} instructions",
        f"excluded {report['excluded_unverifiable']} unverifiable "
        f"({_nonzero(report.get('excluded_by_status', {}))})",
        f"{report['instructions_after_fraction']} instructions after fraction "
        f"{cfg.get('instruction_fraction', 1.0)} (seed {cfg.get('seed', 0)})",
        f"{report['rows_after_first_k']} responses after taking "
        f"{'all' if k is None else f'the first {k}'} per instruction "
        f"({report.get('positives_after_first_k', '?')} correct)",
    ]
    if paired:
        m = cfg.get("max_pairs_per_instruction")
        parts.append(f"{report['rows']} pairs ({'all' if m is None else f'at most {m}'} per instruction) "
                     f"from {report['instructions_used']} instructions, using {report['positives']} correct "
                     f"and {report['negatives']} incorrect responses")
    else:
        parts.append(f"{report['rows']} rows ({report['positives']} positive, {report['negatives']} negative) "
                     f"from {report['instructions_used']} instructions, balance={cfg.get('balance', 'none')} "
                     f"removed {report['dropped_by_balancing']}")
    parts.append(f"instructions dropped: {_nonzero(report['instructions_dropped'])}")
    text = "; ".join(parts) + "."
    if report.get("notes"):
        text += " Note: " + " ".join(report["notes"])
    return text


# --------------------------------------------------------------------------------------------
# Tokens: joined from a dataset's token table (computed once per dataset, prm_ray.stages.tokenize)
# --------------------------------------------------------------------------------------------


def _row_name(examples: pa.Table, i: int, icol: str = "instruction_id", jcol: str = "sample_index") -> str:
    if icol in examples.column_names and jcol in examples.column_names:
        return f"instruction {examples.column(icol)[i].as_py()!r} sample {examples.column(jcol)[i].as_py()}"
    return f"row {i}"


def _check_lengths(examples: pa.Table, max_length: int | None) -> None:
    for col, (icol, jcol) in RESPONSE_KEYS.items():
        if max_length is None or f"{col}_input_ids" not in examples.column_names:
            continue
        lengths = pc.list_value_length(examples.column(f"{col}_input_ids"))
        too_long = pc.indices_nonzero(pc.greater(lengths, max_length)).to_pylist()
        if too_long:
            i = too_long[0]
            raise ValueError(f"{len(too_long)} {col} sequences exceed max_position_embeddings {max_length} (inputs "
                             f"are never truncated), e.g. {_row_name(examples, i, icol, jcol)}: "
                             f"{lengths[i].as_py()} tokens")


def _check_step_labels(examples: pa.Table) -> None:
    """Math-Shepherd rows: one label per step of the response as this tokenizer splits it."""
    if "step_labels" not in examples.column_names:
        return
    bad = pc.indices_nonzero(pc.not_equal(pc.list_value_length(examples.column("step_labels")),
                                          examples.column("response_num_steps"))).to_pylist()
    if bad:
        i = bad[0]
        raise ValueError(f"{_row_name(examples, i)}: {len(examples.column('step_labels')[i])} "
                         f"step labels but the response has {examples.column('response_num_steps')[i].as_py()} "
                         f"steps for this tokenizer; label with the model being trained ({len(bad)} such rows)")


def attach_tokens(examples: pa.Table, tokens: pa.Table, max_length: int | None = None) -> pa.Table:
    """The examples plus the token columns of each text column they have (:data:`RESPONSE_KEYS`),
    taken from ``tokens`` (one row per ``(instruction_id, sample_index)``) by the row's key.

    Sequences longer than ``max_length`` and step labels that do not match the tokenizer's steps
    raise ValueError naming a row; nothing is truncated or dropped."""
    index = {k: i for i, k in enumerate(zip(tokens.column("instruction_id").to_pylist(),
                                            tokens.column("sample_index").to_pylist()))}
    fields = tokens.select(list(TOKEN_NAMES))
    for col, (icol, jcol) in RESPONSE_KEYS.items():
        if col not in examples.column_names:
            continue
        keys = zip(examples.column(icol).to_pylist(), examples.column(jcol).to_pylist())
        try:
            taken = fields.take(pa.array([index[k] for k in keys], pa.int64()))
            if col == "kl_response":
                own = zip(examples.column("instruction_id").to_pylist(), examples.column("sample_index").to_pylist())
                taken = splice_prompts(fields.take(pa.array([index[k] for k in own], pa.int64())), taken)
        except KeyError as exc:
            raise ValueError(f"the token table has no row for instruction {exc.args[0][0]!r} sample "
                             f"{exc.args[0][1]} ({col}): it was made from other data") from None
        for name in taken.column_names:
            examples = examples.append_column(f"{col}_{name}", taken.column(name))
    _check_lengths(examples, max_length)
    _check_step_labels(examples)
    return examples


def tokenize_examples(examples: pa.Table, tokenizer, max_length: int | None = None) -> pa.Table:
    """:func:`attach_tokens` without a token table: each text column tokenized here, in process
    (benchmarks and tests; training reads the cached table)."""
    prompts = examples.column("prompt").to_pylist()
    for col in RESPONSE_KEYS:
        if col in examples.column_names:
            taken = encode_table(tokenizer, prompts, examples.column(col).to_pylist())
            for name in taken.column_names:
                examples = examples.append_column(f"{col}_{name}", taken.column(name))
    _check_lengths(examples, max_length)
    _check_step_labels(examples)
    return examples
