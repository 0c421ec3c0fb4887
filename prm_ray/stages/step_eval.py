"""Step-level evaluation: does a PRM's step reward point at the first wrong step?

Best-of-N tests process rewards only through the answers they pick. Here each response's steps,
split exactly as the PRM splits them (:func:`prm_ray.tokens.encode_pair` with the PRM's tokenizer
and ``eval.step_split``), carry ground truth:

* arith rollouts: the task's step checker (:meth:`prm_ray.tasks.ArithTask.check_steps`) finds the
  first wrong step and its kind, exactly;
* ProcessBench-format files (rows ``problem``, ``steps``, ``label``): the given steps are scored as
  they are (joined by blank lines) and ``label`` is the first wrong step.

Then :mod:`prm_ray.core.process` measures the PRM the ProcessBench way, beside two baselines that
need no training: the policy's own per-step log-likelihood (from the reference log-probs, when the
reference is the policy) and a random scorer.

``run_step_eval`` (``jobs/step_eval.py``) scores the responses with :func:`prm_ray.stages.evaluate.run_evaluation`
(cached per output directory), labels them, picks the threshold on the validation responses and
writes ``step_report.json``, ``steps/`` (one row per response) and the plots. Studies call
:func:`label_steps` and :func:`step_level` on their own rollouts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.json as pajson
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from prm_ray.artifacts import (
    ROLLOUT_META,
    data_dir,
    load_rollouts,
    parquet_source,
    read_json,
    read_prm_card,
    write_json,
    write_parquet_atomic,
)
from prm_ray.config import ConfigError, from_dict, param, save_config, to_dict
from prm_ray.core.process import (
    choose_threshold,
    first_below,
    harmonic_mean,
    process_metrics,
    step_auc,
    threshold_curve,
)
from prm_ray.models import load_tokenizer
from prm_ray.stages.evaluate import EvaluateConfig, EvaluationJobConfig, reference_logprobs, run_evaluation
from prm_ray.stages.rollout import RolloutConfig, make_task
from prm_ray.stages.runtime import init_ray
from prm_ray.tasks import Task
from prm_ray.tokens import encode_pair

__all__ = ["LABEL_COLUMNS", "STEP_COUNTS", "STEP_REPORT", "StepEvalConfig", "label_steps", "label_summary",
           "plot_step_eval", "processbench_dataset", "random_rewards", "rewards_from_scores", "run_step_eval",
           "scorer_report", "step_accuracies", "step_counts", "step_level", "task_of"]

STEP_REPORT = "step_report.json"
LABEL_COLUMNS = ["instruction_id", "sample_index", "prompt", "response", "correct", "steps", "first_error_true",
                 "error_kind", "error_detail"]
"""What :func:`label_steps` returns per response (plus ``likelihood_step_rewards`` given a reference pass)."""
PROCESSBENCH_SKIPS = ("no_steps", "blank_step", "step_with_blank_line", "bad_label", "split_mismatch")
GROUPS = ("right steps", "first wrong step", "steps after it")


# ---------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------


def task_of(rollouts: str | Path) -> Task:
    """The task a rollout directory was made with (its ``rollout_meta.json``)."""
    meta = read_json(Path(rollouts) / ROLLOUT_META)
    if meta is None:
        raise ConfigError(f"rollouts: {rollouts} is not a rollout directory (no {ROLLOUT_META}); give a "
                          "jobs/rollout.py --out or a ProcessBench-format .jsonl/.parquet file")
    return make_task(from_dict(RolloutConfig, meta["config"]))


def _key(iid: str, sidx: int) -> tuple[str, int]:
    return str(iid), int(sidx)


def _reference_by_key(ref_logprobs: str | Path) -> dict[tuple[str, int], list[float]]:
    t = load_rollouts(ref_logprobs, columns=["instruction_id", "sample_index", "ref_token_logp"]).to_pydict()
    return {_key(i, s): lp for i, s, lp in zip(t["instruction_id"], t["sample_index"], t["ref_token_logp"])}


def label_steps(data: str | Path, tokenizer: str, task: Task | None = None, *, step_split: str = "blank_line",
                ref_logprobs: str | Path | None = None) -> tuple[pa.Table, dict]:
    """Every response of ``data`` split into the PRM's steps and labelled: ``(table, skipped)``.

    ``task``: the step checker (rollouts); None: the data's own ``label`` and ``given_steps``
    columns (:func:`processbench_dataset`), where a response whose tokenized steps are not the
    given ones is skipped and counted (``split_mismatch``). ``ref_logprobs``: a reference pass
    over ``data`` (:func:`prm_ray.stages.evaluate.reference_logprobs`); then
    ``likelihood_step_rewards`` is the reference's log-likelihood of each step, the untrained
    baseline when the reference is the policy.
    """
    if task is not None and not task.ERROR_KINDS:
        raise ConfigError(f"task {task.name!r} has no step checker: step-level ground truth needs arith rollouts "
                          "or a ProcessBench-format file (docs/step-eval.md)")
    names = pads.dataset(str(parquet_source(data)), format="parquet").schema.names
    if task is None and not {"label", "given_steps"} <= set(names):
        raise ValueError(f"{data} has no label/given_steps columns: label steps with a task's checker, or prepare "
                         "ProcessBench rows with processbench_dataset")
    rows = load_rollouts(data, columns=LABEL_COLUMNS[:5] + ([] if task else ["label", "given_steps"])).to_pydict()
    ref = _reference_by_key(ref_logprobs) if ref_logprobs is not None else None
    tok = load_tokenizer(tokenizer)
    out: dict[str, list] = {c: [] for c in LABEL_COLUMNS}
    likelihood: list[list[float]] = []
    skipped = Counter()
    for i in range(len(rows["response"])):
        item = encode_pair(tok, rows["prompt"][i], rows["response"][i], step_split=step_split)
        where = f"instruction {rows['instruction_id'][i]!r} sample {rows['sample_index'][i]}"
        if task is not None:
            check = task.check_steps(rows["prompt"][i], item.steps)
            first, kind, detail = check.first_error, check.kind, check.detail
        else:
            if [s.strip() for s in item.steps] != rows["given_steps"][i]:
                skipped["split_mismatch"] += 1
                continue
            first, kind, detail = rows["label"][i], (None if rows["label"][i] < 0 else "labelled"), ""
        for c in LABEL_COLUMNS[:5]:
            out[c].append(rows[c][i])
        out["steps"].append(item.steps)
        out["first_error_true"].append(first)
        out["error_kind"].append(kind)
        out["error_detail"].append(detail)
        if ref is not None:
            lp = ref.get(_key(rows["instruction_id"][i], rows["sample_index"][i]))
            if lp is None:
                raise ValueError(f"{where}: not in the reference pass {ref_logprobs}")
            if len(lp) != len(item.step_ids):
                raise ValueError(f"{where}: {len(lp)} reference log-probs for {len(item.step_ids)} tokens; the "
                                 "reference pass and the PRM must share a tokenizer and step_split")
            likelihood.append(np.bincount(item.step_ids, weights=lp, minlength=len(item.steps)).tolist())
    table = pa.table({**out, "sample_index": pa.array(out["sample_index"], pa.int32()),
                      "first_error_true": pa.array(out["first_error_true"], pa.int32()),
                      "error_kind": pa.array(out["error_kind"], pa.string())})
    if ref is not None:
        table = table.append_column("likelihood_step_rewards", pa.array(likelihood, pa.list_(pa.float64())))
    return table, dict(skipped)


def label_summary(labels: pa.Table, kinds: tuple[str, ...] = ()) -> dict:
    """What the ground truth holds: responses with and without an error, by kind, and the two
    outcome/process disagreements (a right answer reached by a wrong process is what an outcome
    label cannot see; a wrong answer without a step error means the checker missed something)."""
    c = labels.select(["correct", "first_error_true", "error_kind", "steps"]).to_pydict()
    has_error = [e >= 0 for e in c["first_error_true"]]
    by_kind = Counter(k for k in c["error_kind"] if k is not None)
    return {"responses": len(has_error), "steps": sum(len(s) for s in c["steps"]),
            "with_error": sum(has_error), "without_error": len(has_error) - sum(has_error),
            "right_answer_wrong_process": sum(bool(ok) and e for ok, e in zip(c["correct"], has_error)),
            "wrong_answer_no_step_error": sum(ok is not None and not ok and not e for ok, e in zip(c["correct"], has_error)),
            "by_kind": {k: by_kind.get(k, 0) for k in (kinds or sorted(by_kind))}}


# ---------------------------------------------------------------------------------------------
# ProcessBench-format data
# ---------------------------------------------------------------------------------------------


def _read_rows(path: Path) -> pa.Table:
    if path.suffix == ".jsonl":
        try:
            return pajson.read_json(str(path))
        except pa.ArrowInvalid as exc:
            raise ValueError(f"{path}: not JSON lines (one row object per line): {exc}") from None
    if path.suffix == ".parquet":
        return pq.read_table(str(path))
    raise ConfigError(f"{path}: a ProcessBench-format file must be .jsonl or .parquet")


def processbench_dataset(path: str | Path, out: str | Path) -> tuple[Path, dict]:
    """Rows ``problem``, ``steps`` (list of strings), ``label`` (first wrong step, -1 if none) and
    optional ``id`` / ``final_answer_correct``, written as a rollout-like dataset in ``out``: one
    response per problem, the steps joined by blank lines so that the blank-line split gives them
    back as they are. Rows that cannot be scored so are skipped and counted by reason (a step
    with a blank line inside, a blank step, a label outside the steps). Returns ``(out, info)``."""
    path, out = Path(path), Path(out)
    table = _read_rows(path)
    missing = [c for c in ("problem", "steps", "label") if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: ProcessBench rows need problem, steps and label; missing {', '.join(missing)}")
    rows = table.to_pylist()
    skipped = Counter({r: 0 for r in PROCESSBENCH_SKIPS})
    keep: dict[str, list] = {c: [] for c in ("instruction_id", "sample_index", "prompt", "response", "correct",
                                             "extracted_answer", "answer_group", "gold_answer", "label",
                                             "given_steps")}
    for i, r in enumerate(rows):
        steps, label = r["steps"], r["label"]
        if not steps:
            skipped["no_steps"] += 1
        elif any(not str(s).strip() for s in steps):
            skipped["blank_step"] += 1
        elif any("\n\n" in str(s).strip() for s in steps):
            skipped["step_with_blank_line"] += 1
        elif not isinstance(label, int) or not -1 <= label < len(steps):
            skipped["bad_label"] += 1
        else:
            keep["instruction_id"].append(str(r.get("id") if r.get("id") is not None else f"row-{i:06d}"))
            keep["sample_index"].append(0)
            keep["prompt"].append(str(r["problem"]))
            keep["response"].append("\n\n".join(str(s).strip() for s in steps))
            fac = r.get("final_answer_correct")
            keep["correct"].append(bool(fac) if fac is not None else label == -1)
            keep["extracted_answer"].append(None)
            keep["answer_group"].append(None)  # one response per problem: no vote to group
            keep["gold_answer"].append("")
            keep["label"].append(int(label))
            keep["given_steps"].append([str(s).strip() for s in steps])
    if len(set(keep["instruction_id"])) != len(keep["instruction_id"]):
        raise ValueError(f"{path}: duplicate id values")
    if not keep["response"]:
        raise ValueError(f"{path}: no usable rows among {len(rows)} (skipped: {dict(skipped)})")
    data = pa.table({**keep, "sample_index": pa.array(keep["sample_index"], pa.int32()),
                     "extracted_answer": pa.array(keep["extracted_answer"], pa.string()),
                     "answer_group": pa.array(keep["answer_group"], pa.string()),
                     "label": pa.array(keep["label"], pa.int32())})
    data_dir(out).mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(data, data_dir(out) / "part-00000.parquet")
    info = {"source": str(path.resolve()), "rows": len(rows), "used": data.num_rows, "skipped": dict(skipped)}
    write_json(out / "processbench.json", info)
    return out, info


# ---------------------------------------------------------------------------------------------
# Scorers and the step-level table
# ---------------------------------------------------------------------------------------------


def rewards_from_scores(scores: str | Path, labels: pa.Table) -> list[list[float]]:
    """The step rewards of a scoring pass (``SCORE_SCHEMA`` rows), in ``labels``' row order; each
    must have as many steps as the labelled response (else the two were split differently)."""
    t = pads.dataset(str(scores), format="parquet").to_table(columns=["instruction_id", "sample_index", "step_rewards"])
    c = t.to_pydict()
    by = {_key(i, s): r for i, s, r in zip(c["instruction_id"], c["sample_index"], c["step_rewards"])}
    out = []
    for iid, sidx, steps in zip(*labels.select(["instruction_id", "sample_index", "steps"]).to_pydict().values()):
        r = by.get(_key(iid, sidx))
        if r is None:
            raise ValueError(f"{scores}: no score for instruction {iid!r} sample {sidx}")
        if len(r) != len(steps):
            raise ValueError(f"instruction {iid!r} sample {sidx}: {len(r)} scored steps but {len(steps)} labelled; "
                             "score and label with the same tokenizer and step_split")
        out.append(list(r))
    return out


def random_rewards(labels: pa.Table, seed: int = 0) -> list[list[float]]:
    """A random scorer: uniform step rewards, seeded per response (the floor any PRM must beat)."""
    out = []
    for iid, sidx, steps in zip(*labels.select(["instruction_id", "sample_index", "steps"]).to_pydict().values()):
        digest = hashlib.sha256(f"{seed}/{iid}/{sidx}".encode()).digest()
        out.append(np.random.default_rng(int.from_bytes(digest[:8], "big")).random(len(steps)).tolist())
    return out


def _auc(rewards: list[list[float]], first: list[int]) -> dict:
    a = step_auc(rewards, first)
    return {"step_auc": a["auc"], "auc_right_steps": a["right_steps"], "auc_first_wrong_steps": a["first_wrong_steps"]}


def scorer_report(test_rewards: list[list[float]], test_labels: pa.Table, threshold: float,
                  kinds: tuple[str, ...] = ()) -> dict:
    """One scorer on the test responses at a fixed ``threshold``: :func:`process_metrics` and the
    step AUC, overall and per error kind (each kind's responses against every error-free one)."""
    first = test_labels.column("first_error_true").to_pylist()
    kind = test_labels.column("error_kind").to_pylist()
    out = {**process_metrics(test_rewards, first, threshold), **_auc(test_rewards, first)}
    by_kind = {}
    for k in kinds or sorted({x for x in kind if x is not None}):
        idx = [i for i, x in enumerate(kind) if x == k]
        if not idx:
            by_kind[k] = {"with_error": 0, "error_found": 0, "error_accuracy": None, "f1": None,
                          **_auc([], [])}
            continue
        m = process_metrics([test_rewards[i] for i in idx], [first[i] for i in idx], threshold)
        by_kind[k] = {"with_error": len(idx), "error_found": m["error_found"], "error_accuracy": m["error_accuracy"],
                      "f1": harmonic_mean(m["error_accuracy"], out["correct_accuracy"]),
                      **_auc([test_rewards[i] for i in idx], [first[i] for i in idx])}
    out["by_kind"] = by_kind
    return out


def step_level(test_labels: pa.Table, test_rewards: list[list[float]], *, val_labels: pa.Table | None = None,
               val_rewards: list[list[float]] | None = None, threshold: float | None = None,
               kinds: tuple[str, ...] = ()) -> dict:
    """A scorer's step-level result: the threshold (given; else chosen on the validation
    responses; else, flagged ``in_sample``, on the test responses themselves; ``threshold_objective``
    says what it maximised, F1 unless those responses lack one kind), the test metrics
    (:func:`scorer_report`) and both F1-against-threshold curves (for the plots)."""
    first_test = test_labels.column("first_error_true").to_pylist()
    curves = {"test": threshold_curve(test_rewards, first_test)}
    if val_labels is not None:
        curves["validation"] = threshold_curve(val_rewards, val_labels.column("first_error_true").to_pylist())
    objective = None
    if threshold is not None:
        source = "given"
    elif val_labels is not None:
        threshold, objective = choose_threshold(val_rewards, val_labels.column("first_error_true").to_pylist())
        source = "validation"
    else:
        threshold, objective = choose_threshold(test_rewards, first_test)
        source = "in_sample"
    out = {**scorer_report(test_rewards, test_labels, threshold, kinds), "threshold_from": source,
           "threshold_objective": objective}
    if val_labels is not None:
        v = process_metrics(val_rewards, val_labels.column("first_error_true").to_pylist(), threshold)
        out["validation_f1"] = v["f1"]
    return {"metrics": out, "curves": curves}


STEP_COUNTS = ("error_found", "with_error", "no_error_found", "without_error")


def step_counts(labels: pa.Table, rewards: list[list[float]], threshold: float,
                problems: list[str]) -> dict[str, np.ndarray]:
    """The counts behind :func:`process_metrics` per problem (``problems``: instruction ids, the
    order of the study's per-problem arrays), so the step-level accuracies can be bootstrapped
    over problems like every other metric (:meth:`prm_ray.core.stats.Bootstrap.ratio_summary`)."""
    at = {iid: i for i, iid in enumerate(problems)}
    out = {k: np.zeros(len(problems)) for k in STEP_COUNTS}
    for iid, r, e in zip(labels.column("instruction_id").to_pylist(), rewards,
                         labels.column("first_error_true").to_pylist()):
        if iid not in at:
            raise ValueError(f"step labels hold instruction {iid!r}, which the scored test problems do not")
        i, pred = at[iid], first_below(r, threshold)
        if e >= 0:
            out["with_error"][i] += 1
            out["error_found"][i] += pred == e
        else:
            out["without_error"][i] += 1
            out["no_error_found"][i] += pred == -1
    return out


def step_accuracies(totals: dict[str, float]) -> dict[str, float | None]:
    """``error_accuracy``, ``correct_accuracy`` and ``f1`` of summed :data:`STEP_COUNTS`."""
    err = totals["error_found"] / totals["with_error"] if totals["with_error"] else None
    ok = totals["no_error_found"] / totals["without_error"] if totals["without_error"] else None
    return {"f1": harmonic_mean(err, ok), "error_accuracy": err, "correct_accuracy": ok}


def predicted_table(labels: pa.Table, rewards: list[list[float]], threshold: float) -> pa.Table:
    """``labels`` with the scorer's ``step_rewards`` and ``first_error_pred`` (one row per response)."""
    pred = [first_below(r, threshold) for r in rewards]
    cols = [c for c in labels.column_names if c != "likelihood_step_rewards"]
    return labels.select(cols).append_column("first_error_pred", pa.array(pred, pa.int32())) \
        .append_column("step_rewards", pa.array(rewards, pa.list_(pa.float64())))


def _groups(labels: pa.Table, rewards: list[list[float]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {g: [] for g in GROUPS}
    for r, e in zip(rewards, labels.column("first_error_true").to_pylist()):
        cut = len(r) if e < 0 else e
        out[GROUPS[0]] += r[:cut]
        if e >= 0:
            out[GROUPS[1]].append(r[e])
            out[GROUPS[2]] += r[e + 1 :]
    return out


def plot_step_eval(scorers: dict[str, dict], labels: pa.Table, rewards: dict[str, list[list[float]]],
                   out: Path) -> list[Path]:
    """``step_rewards.png``: per scorer, the step-reward distributions of right steps, first wrong
    steps and steps after them, with its threshold; ``f1_threshold.png``: F1 against the threshold
    on validation and test, the chosen threshold marked."""
    names = list(scorers)
    paths = [out / "step_rewards.png", out / "f1_threshold.png"]
    # Step rewards have long low tails: the x axes start at the 2nd percentile (lower values are
    # drawn in the first bin) so that the bulk, where the threshold sits, stays readable.
    ranges = {}
    for name in names:
        values = np.array([v for r in rewards[name] for v in r], dtype=np.float64)
        lo, hi = (float(np.percentile(values, 2)), float(values.max())) if len(values) else (0.0, 1.0)
        ranges[name] = (lo, hi if hi > lo else lo + 1.0)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        lo, hi = ranges[name]
        for g, v in _groups(labels, rewards[name]).items():
            if v:
                ax.hist(np.clip(v, lo, hi), bins=np.linspace(lo, hi, 40), density=True, histtype="step",
                        linewidth=1.4, label=f"{g} ({len(v)})")
        ax.axvline(scorers[name]["metrics"]["threshold"], color="k", linestyle=":", linewidth=1, label="threshold")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step reward (lowest 2% in the first bin)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        for split, curve in scorers[name]["curves"].items():
            f1 = [np.nan if x is None else x for x in curve["f1"]]
            ax.step(curve["threshold"], f1, where="mid", label=split)
        ax.axvline(scorers[name]["metrics"]["threshold"], color="k", linestyle=":", linewidth=1, label="threshold")
        lo, hi = ranges[name]
        ax.set_xlim(lo, hi + 0.05 * (hi - lo))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("threshold")
        ax.set_ylabel("F1")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    return paths


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class StepEvalConfig:
    """Step-level evaluation of one PRM (``jobs/step_eval.py``): ProcessBench's F1 and the step AUC
    on responses with step-level ground truth, beside the policy's likelihood and a random scorer."""

    prm: str = param(dataclasses.MISSING, "the PRM: a jobs/train_prm.py output, or any causal-LM directory or hub "
                                          "id (then say reference_model)")
    rollouts: str = param(dataclasses.MISSING, "the responses to evaluate: an arith jobs/rollout.py --out (steps "
                                               "checked exactly) or a ProcessBench-format .jsonl/.parquet file "
                                               "(problem, steps, label)")
    validation: str | None = param(None, "responses of the same kind where the threshold is chosen (e.g. "
                                         "validation-split rollouts); null: `threshold`, else chosen on `rollouts` "
                                         "themselves and reported as in_sample")
    threshold: float | None = param(None, "a fixed threshold for the PRM (a step is wrong when its reward is below "
                                          "it); null: chosen (see validation)")
    out: str = param("runs/step-eval", "output directory: step_report.json, steps/, plots, and the scoring passes "
                                       "(test/, validation/: reused by a later run)")
    reference_model: str | None = param(None, "the implicit reward's reference (and the likelihood baseline's "
                                              "model); null: the PRM card's")
    beta: float | None = param(None, "the PRM's beta; null: the card's, else 0.05")
    baselines: bool = param(True, "also score the policy's per-step log-likelihood (the reference model's; needs "
                                  "one) and a random scorer, each with its own threshold")
    seed: int = param(0, "the random scorer's seed")
    eval: EvaluateConfig = param(factory=EvaluateConfig, help="")
    overwrite: bool = param(False, "replace scoring passes made with other settings (else refused)")
    ray_address: str | None = param(None, "null: RAY_ADDRESS, a running local cluster, or a new one")

    def __post_init__(self) -> None:
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigError(f"threshold must be a finite number or null, got {self.threshold}")
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"beta must be a finite number > 0, got {self.beta}")


def _is_file(path: str) -> bool:
    return Path(path).suffix in (".jsonl", ".parquet") and Path(path).is_file()


def _split(cfg: StepEvalConfig, source: str, name: str, reference: str | None) -> dict:
    """Score, reference-pass and label one set of responses (``name``: test or validation)."""
    out = Path(cfg.out) / name
    task = None
    if _is_file(source):
        if cfg.eval.step_split != "blank_line":
            raise ConfigError(f"eval.step_split is {cfg.eval.step_split!r}, but ProcessBench steps are scored as given "
                              "(blank_line); drop the setting")
        data, info = processbench_dataset(source, out / "processbench")
    else:
        if not Path(source).is_dir():
            raise FileNotFoundError(f"{name}: no rollout directory or ProcessBench file at {source}")
        task, data, info = task_of(source), Path(source), None
    job = EvaluationJobConfig(prm=cfg.prm, data=str(data), out=str(out), reference_model=cfg.reference_model,
                              beta=cfg.beta, eval=cfg.eval, overwrite=cfg.overwrite, ray_address=cfg.ray_address)
    result = run_evaluation(job)
    ref_dir = out / "ref-logprobs"
    if cfg.baselines and reference is not None and not cfg.eval.use_reference:
        reference_logprobs(data, reference, ref_dir, cfg.eval.pass_config(), step_split=cfg.eval.step_split,
                           overwrite=cfg.overwrite)
    labels, skipped = label_steps(data, cfg.prm, task, step_split=cfg.eval.step_split,
                                  ref_logprobs=ref_dir if cfg.baselines and reference is not None else None)
    if info is not None:
        info["skipped"]["split_mismatch"] = skipped.get("split_mismatch", 0)
    return {"labels": labels, "scores": out / "eval" / "scores", "evaluation": result, "processbench": info,
            "kinds": tuple(task.ERROR_KINDS) if task is not None else ()}


def run_step_eval(cfg: StepEvalConfig) -> dict:
    """Score, label and measure (see the module docstring); returns the report also written as
    ``<out>/step_report.json``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.ray_address)
    card = read_prm_card(cfg.prm)
    # The likelihood baseline scores with the policy: the reference, else the model the PRM was trained from.
    reference = cfg.reference_model or card.get("reference_model") or card.get("trained_from")
    if cfg.baselines and reference is None:
        warnings.warn("no reference model: the policy log-likelihood baseline is skipped", stacklevel=2)
    test = _split(cfg, cfg.rollouts, "test", reference)
    val = _split(cfg, cfg.validation, "validation", reference) if cfg.validation else None
    kinds = test["kinds"]
    save_config(cfg, out / "config.yaml")
    labels = test["labels"]
    rewards = {"prm": rewards_from_scores(test["scores"], labels)}
    val_rewards = {"prm": rewards_from_scores(val["scores"], val["labels"])} if val else {}
    if cfg.baselines:
        if "likelihood_step_rewards" in labels.column_names:
            rewards["policy log-likelihood"] = labels.column("likelihood_step_rewards").to_pylist()
            if val:
                val_rewards["policy log-likelihood"] = val["labels"].column("likelihood_step_rewards").to_pylist()
        rewards["random"] = random_rewards(labels, cfg.seed)
        if val:
            val_rewards["random"] = random_rewards(val["labels"], cfg.seed)
    scorers = {name: step_level(labels, r, val_labels=val["labels"] if val else None, val_rewards=val_rewards.get(name),
                                threshold=cfg.threshold if name == "prm" else None, kinds=kinds)
               for name, r in rewards.items()}
    if val is None and cfg.threshold is None:
        warnings.warn("no validation set and no threshold: each scorer's threshold is chosen on the evaluated "
                      "responses themselves (in_sample, optimistic); give --validation", stacklevel=2)
    table = predicted_table(labels, rewards["prm"], scorers["prm"]["metrics"]["threshold"])
    data_dir(out / "steps").mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(table, data_dir(out / "steps") / "part-00000.parquet")
    plots = plot_step_eval(scorers, labels, rewards, out)
    report = {"prm": cfg.prm, **scorers["prm"]["metrics"],
              "baselines": {n: s["metrics"] for n, s in scorers.items() if n != "prm"},
              "labels": label_summary(labels, kinds),
              "validation_labels": label_summary(val["labels"], kinds) if val else None,
              "processbench": {"test": test["processbench"], "validation": val and val["processbench"]}
              if test["processbench"] else None,
              "outcome_metrics": test["evaluation"]["metrics"], "config": to_dict(cfg),
              "files": {"steps": str(out / "steps"), "plots": [str(p) for p in plots]}}
    write_json(out / STEP_REPORT, report)
    (out / "curves.json").write_text(json.dumps({n: s["curves"] for n, s in scorers.items()}))
    return report
