"""The experiment runner of the paper's studies: policy -> rollouts -> PRMs -> evaluation -> report.

A study is a list of :class:`PRMSpec` (what to train and how to score it) plus a shared setup
(:class:`StudyConfig`); ``jobs/scale_responses.py`` and its siblings only build their grid and call
:func:`run_study`. One function per stage below, each returning a typed record.

Every stage is reused when its inputs are unchanged: rollouts live under
``<runs_dir>/rollouts/<split>-<hash of their config>``, PRMs under
``<runs_dir>/prms/<name>-<hash of their training settings>``, evaluations under
``<runs_dir>/evals/<prm>/<rollouts>-<hash>``, so two studies that need the same rollouts, PRM
(e.g. CE with 8 responses per instruction) or evaluation compute it once.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from prm_ray.artifacts import (
    check_settings,
    data_dir,
    first_difference,
    load_rollouts,
    read_json,
    read_prm_card,
    read_timing,
    write_json,
    write_timing,
)
from prm_ray.config import ConfigError, from_dict, merge, save_config, to_dict
from prm_ray.core.flops import forward_flops
from prm_ray.core.stats import Bootstrap
from prm_ray.models import count_parameters
from prm_ray.policy.bootstrap import BootstrapConfig, bootstrap
from prm_ray.stages.evaluate import (
    METRICS_FILE,
    EvaluateConfig,
    evaluate_prm,
    per_problem,
    problems_from_scores,
    reaggregate,
    reference_logprobs,
    score_scale,
)
from prm_ray.stages.rollout import EngineConfig, RolloutConfig, VerifierConfig, run_rollouts
from prm_ray.stages.runtime import init_ray, measure
from prm_ray.stages.shepherd import run_shepherd
from prm_ray.stages.step_eval import (
    STEP_COUNTS,
    label_steps,
    label_summary,
    plot_step_eval,
    random_rewards,
    rewards_from_scores,
    step_accuracies,
    step_counts,
    step_level,
    task_of,
)
from prm_ray.stages.train.driver import train_prm
from prm_ray.study.accounting import RolloutTokens, prm_compute
from prm_ray.study.report import write_report
from prm_ray.study.specs import (
    AGGREGATIONS_COMPARED,
    GeneratorConfig,
    PRMSpec,
    StudyConfig,
    eval_dir,
    reference_dir,
    rollout_dir,
    sampling_key,
    stage_hash,
    train_config,
)

__all__ = ["Row", "RolloutSet", "SeedRun", "StageRecord", "adopt_study_evaluations", "axis_differences", "claim_study_dir",
           "run_study", "summarize"]

Log = Callable[[str], Any]


@dataclass
class StageRecord:
    """One line of the report's stage table: what ran, how long, whether it was reused, its FLOPs.
    ``made_s``: the wall seconds of the run(s) that made the output (kept next to it), so a study
    resumed over several runs still reports what each stage cost; None where nothing was kept."""

    stage: str
    wall_s: float
    reused: bool
    cpu_s: float | None = None
    flops: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    made_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stage": self.stage, "wall_s": self.wall_s, "reused": self.reused}
        if self.cpu_s is not None:
            out["cpu_s"] = self.cpu_s
        if self.flops is not None:
            out["flops"] = self.flops
        if self.made_s is not None:
            out["made_wall_s"] = self.made_s
        return {**out, **self.details}


def _timed(where: Path, name: str, measured: dict, reused: bool) -> float | None:
    """Keep a freshly made output's timing next to it; return the wall seconds it took to make."""
    if not reused:
        write_timing(where, name, measured)
    return (read_timing(where, name) or {}).get("wall_s")


@dataclass
class RolloutSet:
    """A finished rollout stage: where the rows are, their summary and token counts."""

    path: Path
    summary: dict
    tokens: RolloutTokens
    record: StageRecord


@dataclass
class LabelSet:
    """The finished Math-Shepherd step labels of the training rollouts."""

    path: Path
    summary: dict
    record: StageRecord


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def policy_stage(cfg: StudyConfig, log: Log) -> StageRecord:
    """The policy: shipped in the repo by default (then this costs nothing), else bootstrapped."""
    t0 = time.time()
    if cfg.bootstrap_if_missing and not (Path(cfg.policy) / "config.json").exists():
        log(f"policy: none at {cfg.policy}; training the embedded default policy there (bootstrap)")
        bcfg = copy.deepcopy(cfg.bootstrap)
        bcfg.out = cfg.policy
        card = bootstrap(bcfg)
        wall = time.time() - t0
        return StageRecord("policy", wall, False, details={"train_seconds": card["train"]["train_seconds"]}, made_s=wall)
    return StageRecord("policy", time.time() - t0, True)


def rollout_stage(cfg: StudyConfig, rc: RolloutConfig, label: str, params: int, log: Log,
                  policy: str | None = None) -> RolloutSet:
    """Rollouts of ``policy`` (None: the study's)."""
    rc = copy.deepcopy(rc)
    rc.model = policy or cfg.policy
    rc.ray_address = cfg.ray_address or rc.ray_address
    out = rollout_dir(cfg, rc)
    rc.out = str(out)
    log(f"{label}: {rc.limit} {rc.split} instructions x {rc.sampling.n} -> {out}")
    with measure() as m:
        summary = run_rollouts(rc)
    tokens = RolloutTokens(out, cfg.policy)
    record = StageRecord(
        label, m["wall_s"], summary["this_run"]["shards_done"] == 0, cpu_s=m["cpu_s"],
        flops=forward_flops(params, tokens.prompt_total + tokens.generated_total),
        details={"prompt_tokens": tokens.prompt_total, "generated_tokens": tokens.generated_total,
                 "instructions": summary["instructions"], "responses": summary["responses"],
                 "pass@1": summary["pass@1"], "pass@N": summary["pass@N"],
                 "verify_status": summary["verify_status"], "all_runs": summary.get("all_runs")},
        made_s=(summary.get("all_runs") or {}).get("wall_seconds"))
    return RolloutSet(out, summary, tokens, record)


def shepherd_stage(cfg: StudyConfig, train: RolloutSet, params: int, log: Log, method: str = "monte_carlo") -> LabelSet:
    """Step labels of the training rollouts (``cfg.shepherd`` with ``method``: Math-Shepherd's
    completions, or the task's checker), keyed like a rollout set."""
    sc = copy.deepcopy(cfg.shepherd)
    sc.method = method
    sc.rollouts, sc.model = str(train.path), cfg.policy
    # Left at their defaults, the completions run on the training rollouts' engine and verifier
    # pools: the same policy sampling the same kind of text (on a cluster: the GPU nodes).
    if sc.engine == EngineConfig():
        sc.engine = copy.deepcopy(cfg.train_rollouts.engine)
    if sc.verifier == VerifierConfig():
        sc.verifier = copy.deepcopy(cfg.train_rollouts.verifier)
    sc.ray_address = cfg.ray_address or sc.ray_address
    out = Path(cfg.runs_dir) / "shepherd" / f"{train.path.name}-{stage_hash(sampling_key(sc))}"
    sc.out = str(out)
    how = f"{sc.completions_per_step} completions per step" if method == "monte_carlo" else "the step checker"
    log(f"step labels ({method}): {how} on {sc.responses_per_instruction or 'all'} responses per instruction -> {out}")
    with measure() as m:
        summary = run_shepherd(sc)
    lab = load_rollouts(out, columns=["completion_prompt_tokens", "completion_generated_tokens"])
    prompt, generated = (sum(lab.column(c).to_pylist()) for c in lab.column_names)
    name = "Math-Shepherd step labels" + ("" if method == "monte_carlo" else f" ({method})")
    record = StageRecord(name, m["wall_s"], bool(summary.get("reused")), cpu_s=m["cpu_s"],
                         flops=forward_flops(params, prompt + generated),
                         details={"prompt_tokens": prompt, "generated_tokens": generated, "responses": lab.num_rows},
                         made_s=((summary.get("timing") or {}).get("total") or {}).get("wall_seconds"))
    return LabelSet(out, summary, record)


def reference_stage(cfg: StudyConfig, rollouts: RolloutSet, dtype: str, label: str,
                    log: Log) -> tuple[Path, StageRecord]:
    """Per-token reference log-probs of a rollout set, computed once and read by every PRM. The
    held-out sets' follow eval.step_split (the release split scores rewritten texts); the training
    set's are of the raw responses, which training scores."""
    reference = cfg.reference
    split = "blank_line" if label == "train" else cfg.eval.step_split
    out = reference_dir(cfg, rollouts.path, dtype, split)
    log(f"reference log-probs of the {label} responses -> {out}")
    info = reference_logprobs(rollouts.path, reference, out, replace(cfg.eval.pass_config(), dtype=dtype),
                              step_split=split)
    record = StageRecord(f"reference log-probs ({label})", 0.0 if info["reused"] else info["seconds"], info["reused"],
                         flops=forward_flops(count_parameters(reference),
                                             rollouts.tokens.prompt_total + rollouts.tokens.generated_total),
                         made_s=info["seconds"])
    return out, record


def _zero_scores(test_data: Path) -> pa.Table:
    """The test rollouts as a score table with all-zero scores (voting/pass@k ignore the score)."""
    t = load_rollouts(test_data, columns=["instruction_id", "sample_index", "correct", "answer_group"])
    return t.append_column("score_min", pa.array([0.0] * t.num_rows, pa.float64()))


def _likelihood_scores(ref_data: Path) -> pa.Table:
    """Test responses scored by the reference policy's log-likelihood (sum over response tokens)."""
    t = pads.dataset(str(data_dir(ref_data)), format="parquet").to_table(
        columns=["instruction_id", "sample_index", "correct", "answer_group", "ref_token_logp"])
    sums = [float(sum(v)) for v in t.column("ref_token_logp").to_pylist()]
    return t.drop_columns(["ref_token_logp"]).append_column("score_min", pa.array(sums, pa.float64()))


@dataclass
class StepTruth:
    """The step-level ground truth of the validation and test responses (the task's checker on
    the PRMs' steps), with the policy-likelihood step rewards of each."""

    validation: RolloutSet
    ref_validation: Path
    val_labels: pa.Table
    test_labels: pa.Table
    kinds: tuple[str, ...]


@dataclass
class Generator:
    """Another generator's test responses (paper Table 1) with the PRMs' reference log-probs of them."""

    name: str
    policy: str
    temperature: float | None
    test: RolloutSet
    ref_test: Path


def generator_policy(cfg: StudyConfig, g: GeneratorConfig, log: Log) -> tuple[str, list[StageRecord]]:
    """A generator's model: its ``policy``; with ``bootstrap`` changes and no policy, a policy
    bootstrapped with the study's recipe changed by them into ``<runs_dir>/generators/<name>-<hash>``
    (a stage output like any other, reused); a ``policy`` directory without a model is bootstrapped
    there when the generator gives changes or the study bootstraps its own policy."""
    policy = g.policy or cfg.policy
    if g.policy and ((Path(policy) / "config.json").exists() or not (g.bootstrap or cfg.bootstrap_if_missing)):
        return policy, []
    if not g.policy and not g.bootstrap:
        return policy, []
    if cfg.train_rollouts.task != "arith":
        raise ConfigError(f"generators: {g.name!r}: only the arith policy can be bootstrapped")
    bcfg = from_dict(BootstrapConfig, merge(to_dict(cfg.bootstrap), g.bootstrap))
    if not g.policy:
        key = {k: v for k, v in to_dict(bcfg).items() if k not in ("out", "overwrite")}
        policy = str(Path(cfg.runs_dir) / "generators" / f"{g.name}-{stage_hash(key)}")
    bcfg.out = policy
    log(f"generator {g.name}: bootstrapping a policy into {policy} ({g.bootstrap or 'the study bootstrap'})")
    t0 = time.time()
    card = bootstrap(bcfg)
    return policy, [StageRecord(f"policy ({g.name})", time.time() - t0, bool(card.get("reused")),
                                details={"train_seconds": card["train"]["train_seconds"]},
                                made_s=card["train"]["train_seconds"])]


def generator_rollouts(cfg: StudyConfig, g: GeneratorConfig | None,
                       log: Log) -> tuple[str, RolloutSet, list[StageRecord]]:
    """The model and test rollouts of generator ``g`` (its policy from :func:`generator_policy`, at
    its temperature; the same problems as the study's), or with ``g`` None the study's policy's."""
    if g is None:
        test = rollout_stage(cfg, cfg.test_rollouts, "test rollouts", count_parameters(cfg.policy), log)
        return cfg.policy, test, [test.record]
    policy, records = generator_policy(cfg, g, log)
    rc = copy.deepcopy(cfg.test_rollouts)
    if g.temperature is not None:
        rc.sampling.temperature = g.temperature
    test = rollout_stage(cfg, rc, f"test rollouts ({g.name})", count_parameters(policy), log, policy=policy)
    return policy, test, records + [test.record]


def generator_stage(cfg: StudyConfig, g: GeneratorConfig, log: Log) -> tuple[Generator, list[StageRecord]]:
    """A generator's test rollouts (:func:`generator_rollouts`) and the reference pass over them
    (the likelihood baseline, PRMs scored with the reference)."""
    policy, test, records = generator_rollouts(cfg, g, log)
    ref, record = reference_stage(cfg, test, cfg.eval.dtype, f"test, {g.name}", log)
    return Generator(g.name, policy, g.temperature, test, ref), records + [record]


@dataclass
class Inputs:
    """What every row of a study shares: the data, the reference caches and the policy's size."""

    params: int
    train: RolloutSet
    test: RolloutSet
    labels: dict[str, LabelSet]  # by label method (PRMSpec.label_method)
    ref_test: Path
    ref_train: Path | None
    steps: StepTruth | None = None
    generators: list[Generator] = field(default_factory=list)


def step_truth_stage(cfg: StudyConfig, test: RolloutSet, ref_test: Path, params: int,
                     log: Log) -> tuple[StepTruth | None, list[StageRecord], str | None]:
    """Validation rollouts, their reference pass and the step labels of both held-out sets; None
    (with the reason) when the study has no step-level table."""
    if not cfg.step_eval:
        return None, [], "step_eval is false"
    task = task_of(test.path)
    if not task.ERROR_KINDS:
        return None, [], f"task {task.name!r} has no step checker"
    val = rollout_stage(cfg, cfg.validation_rollouts, "validation rollouts", params, log)
    ref_val, record = reference_stage(cfg, val, cfg.eval.dtype, "validation", log)
    with measure() as m:
        labels = {name: label_steps(path, cfg.prm_base, task, step_split=cfg.eval.step_split, ref_logprobs=ref)[0]
                  for name, path, ref in (("validation", val.path, ref_val), ("test", test.path, ref_test))}
    # Relabelled on every run (seconds): the checker is cheap next to keeping labels per tokenizer.
    log(f"step labels: {labels['test'].num_rows} test and {labels['validation'].num_rows} validation responses "
        f"({m['wall_s']:.1f} s)")
    truth = StepTruth(val, ref_val, labels["validation"], labels["test"], tuple(task.ERROR_KINDS))
    return truth, [val.record, record], None


def _evaluate(cfg: StudyConfig, prm: str, data: Path, ecfg: EvaluateConfig) -> tuple[dict, Path]:
    """:func:`evaluate_prm` into the evaluation's shared place (:func:`eval_dir`), reused by every
    study that asks for the same PRM, data and eval config."""
    out = eval_dir(cfg.runs_dir, prm, data, to_dict(ecfg.resolved()))
    return evaluate_prm(prm, data, out, ecfg, overwrite=cfg.overwrite), out


def _step_row(cfg: StudyConfig, spec: PRMSpec, inputs: Inputs, tc_out: str, test_dir: Path, infer_ref: bool,
              seed: int, log: Log) -> tuple[dict, StageRecord]:
    """A PRM's step-level result (:func:`step_level`, plus its ``test_rewards`` for the plots):
    scored on the validation responses for its threshold, measured on the test responses' scores
    that the evaluation made (in ``test_dir``)."""
    st = inputs.steps
    with measure() as t:
        ev, val_dir = _evaluate(cfg, tc_out, st.ref_validation if infer_ref else st.validation.path,
                                replace(cfg.eval, use_reference=infer_ref))
    test_r = rewards_from_scores(test_dir / "scores", st.test_labels)
    res = step_level(st.test_labels, test_r, val_labels=st.val_labels,
                     val_rewards=rewards_from_scores(val_dir / "scores", st.val_labels), kinds=st.kinds)
    res["test_rewards"] = test_r
    m = res["metrics"]
    log(f"{spec.name}: first wrong step found: F1 {_fmt(m['f1'])}, step AUC {_fmt(m['step_auc'])}")
    return res, StageRecord(f"eval {spec.name} (validation, seed {seed})",
                            t["wall_s"], ev["reused"], cpu_s=t["cpu_s"], made_s=_timed(val_dir, "eval", t, ev["reused"]))


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


@dataclass
class SeedRun:
    """One training seed of a row: its report entry, stage records, per-problem metric values (in
    the order of ``problems``, sorted instruction ids) and step-level result (None without one)."""

    result: dict
    records: list[StageRecord]
    values: dict[str, np.ndarray]
    problems: list[str]
    step: dict | None
    generators: dict[str, tuple[list[str], dict[str, np.ndarray]]] = field(default_factory=dict)
    aggregations: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # method -> bon@N per problem


@dataclass
class Row:
    """A row of the study: its report entry and every seed's run (none for an undefined cell)."""

    result: dict
    runs: list[SeedRun]

    @property
    def records(self) -> list[StageRecord]:
        return [r for run in self.runs for r in run.records]


def prm_stage(cfg: StudyConfig, spec: PRMSpec, inputs: Inputs, seed: int, log: Log) -> SeedRun:
    """Train and evaluate one row with one training seed."""
    train_with_ref, infer_ref = spec.uses_reference(cfg)
    labels = inputs.labels[spec.label_method] if spec.explicit else None
    tc = train_config(cfg, spec, labels.path if labels else inputs.train.path, inputs.ref_train, seed)
    log(f"{spec.name} (seed {seed}): training -> {tc.out}")
    with measure() as train_time:
        report = train_prm(tc)
    train_made = _timed(Path(tc.out), "train", train_time, report["reused"])
    ecfg = replace(cfg.eval, use_reference=infer_ref)
    log(f"{spec.name} (seed {seed}): evaluating on {inputs.test.summary['instructions']} test problems x "
        f"{cfg.test_rollouts.sampling.n}")
    with measure() as eval_time:
        ev, test_dir = _evaluate(cfg, tc.out, inputs.ref_test if infer_ref else inputs.test.path, ecfg)
    eval_made = _timed(test_dir, "eval", eval_time, ev["reused"])
    scale, votes = score_scale(read_prm_card(tc.out)), ev.get("votes_by", "answer_group")
    own = f"score_{cfg.eval.aggregation}"
    scores = pads.dataset(str(test_dir / "scores"), format="parquet").to_table(
        columns=["instruction_id", "sample_index", "correct", votes, own, "step_rewards"])
    problems = problems_from_scores(scores, cfg.eval.aggregation, votes)
    values = per_problem(problems, cfg.eval, scale)
    # Best-of-N under the other aggregations, from the same step rewards (no model pass); the
    # study's own is the row's values, so both tables print the same numbers for it.
    others = [a for a in AGGREGATIONS_COMPARED[spec.explicit] if a != cfg.eval.aggregation]
    rescored = reaggregate(scores.drop_columns([own]), others)
    aggregations = {a: {k: v for k, v in (values if a == cfg.eval.aggregation else per_problem(
        problems_from_scores(rescored, a, votes), cfg.eval, scale)).items() if k.startswith("bon@")}
        for a in AGGREGATIONS_COMPARED[spec.explicit]}
    m = ev["metrics"]
    log(f"{spec.name} (seed {seed}): bon@{cfg.headline_n} {m[f'bon@{cfg.headline_n}']:.3f} "
        f"(majority {m[f'majority@{cfg.headline_n}']:.3f}, pass@1 {m['pass@1']:.3f})")
    tokens = float(report["compute"]["trained_tokens"])
    compute = prm_compute(
        params=inputs.params, prm_params=count_parameters(tc.model), dataset=tc.dataset, epochs=tc.epochs, train_tokens=tokens, rollouts=inputs.train.tokens,
        rollout_runs=inputs.train.summary.get("all_runs"), labels_dir=labels.path if labels else None,
        labels_timing=((labels.summary.get("timing") or {}).get("total") if labels else None),
        reference_train=train_with_ref and not spec.explicit, test_tokens=inputs.test.tokens,
        reference_infer=infer_ref, train_dir=Path(tc.out), eval_dir=test_dir)
    records = [
        StageRecord(f"train {spec.name} (seed {seed})", train_time["wall_s"], report["reused"],
                    cpu_s=train_time["cpu_s"],
                    flops=compute["stages"]["training"]["flops"]
                    + compute["stages"].get("reference log-probs", {}).get("flops", 0.0),
                    details={"train_tokens": tokens}, made_s=train_made),
        StageRecord(f"eval {spec.name} (seed {seed})", eval_time["wall_s"], ev["reused"], cpu_s=eval_time["cpu_s"],
                    flops=compute["stages"]["scoring"]["flops"], made_s=eval_made),
    ]
    step = None
    if inputs.steps is not None:
        step, record = _step_row(cfg, spec, inputs, tc.out, test_dir, infer_ref, seed, log)
        records.append(record)
    generators = {}
    for gen in inputs.generators:
        with measure() as t:
            gev, gdir = _evaluate(cfg, tc.out, gen.ref_test if infer_ref else gen.test.path, ecfg)
        gp = problems_from_scores(gdir / "scores", cfg.eval.aggregation, gev.get("votes_by", "answer_group"))
        generators[gen.name] = ([p["instruction_id"] for p in gp], per_problem(gp, cfg.eval, scale))
        log(f"{spec.name} (seed {seed}): on generator {gen.name}: bon@{cfg.headline_n} "
            f"{gev['metrics'][f'bon@{cfg.headline_n}']:.3f}")
        records.append(StageRecord(f"eval {spec.name} (seed {seed}, generator {gen.name})", t["wall_s"], gev["reused"],
                                   cpu_s=t["cpu_s"], made_s=_timed(gdir, "eval", t, gev["reused"])))
    ds = report.get("dataset", {})
    result = {"seed": seed, "prm": tc.out, "eval_dir": str(test_dir), "metrics": m, "compute": compute,
              "train": {"examples": report.get("examples"), "steps": report.get("steps"),
                        "dataset_rows": ds.get("rows"), "final_metrics": report.get("final_metrics")}}
    return SeedRun(result, records, values, [p["instruction_id"] for p in problems], step, generators, aggregations)


def row_stage(cfg: StudyConfig, spec: PRMSpec, inputs: Inputs, log: Log) -> Row:
    """Train and evaluate one row once per training seed (``cfg.seeds``). Its numbers across the
    seeds (means, intervals) are filled in by :func:`summarize`, which sees every row."""
    train_with_ref, infer_ref = spec.uses_reference(cfg)
    k = spec.responses_per_instruction
    if spec.explicit:
        k = cfg.shepherd.responses_per_instruction  # the labelled responses it trains on
    entry = {"name": spec.name, "objective": spec.objective,
             "responses_per_instruction": k or cfg.train_rollouts.sampling.n,
             "instruction_fraction": spec.instruction_fraction, "balance": spec.balance,
             "reference": train_with_ref, "reference_at_inference": infer_ref,
             "train_overrides": spec.train_overrides, "axis": spec.axis}
    if spec.explicit:
        entry["label_method"] = spec.label_method
    if spec.undefined:
        log(f"{spec.name}: not defined ({spec.undefined})")
        return Row({**entry, "status": "undefined", "reason": spec.undefined, "metrics": None}, [])
    runs = [prm_stage(cfg, spec, inputs, seed, log) for seed in cfg.seeds]
    first = runs[0].result
    # Build cost and training sizes: the first seed's (the seeds differ only in order and sampling).
    return Row({**entry, "status": "ok", "seeds": list(cfg.seeds), "prm": first["prm"], "compute": first["compute"],
                "train": first["train"], "runs": [r.result for r in runs]}, runs)


# ---------------------------------------------------------------------------------------------
# Means and intervals over seeds and problems
# ---------------------------------------------------------------------------------------------


def axis_differences(boot: Bootstrap, rows: list[Row], axis: str) -> dict[str, dict]:
    """Best-of-N of each row minus the first row of its series along a numeric axis (k = 2 -> 8
    responses, 1k -> 4k instructions), paired over the test problems with each side's seeds
    resampled: whether moving along the axis helps beyond the noise, which the rows' own
    intervals (each against the baselines) cannot say. Keyed ``"<row> - <first row>"``."""
    series: dict[str, list[Row]] = {}
    for row in rows:
        at = (row.result.get("axis") or {}).get(axis)
        if row.runs and isinstance(at, (int, float)) and not isinstance(at, bool):
            series.setdefault(row.result["axis"].get("series", row.result["objective"]), []).append(row)
    out = {}
    for members in series.values():
        members.sort(key=lambda r: r.result["axis"][axis])
        first = members[0]
        for row in members[1:]:
            if row.runs[0].problems != first.runs[0].problems:
                raise ValueError(f"{row.result['name']} and {first.result['name']} were scored on other problems")
            a, b = row.result["name"], first.result["name"]
            out[f"{a} - {b}"] = {k: boot.difference(np.stack([r.values[k] for r in row.runs]),
                                                    np.stack([r.values[k] for r in first.runs]), a, b)
                                 for k in row.runs[0].values if k.startswith("bon@")}
    return out


def _interval_fields(summaries: dict[str, dict]) -> dict:
    """``metrics`` (means), ``intervals`` and ``by_seed`` of per-metric :class:`Bootstrap` summaries."""
    return {"metrics": {k: s["mean"] for k, s in summaries.items()},
            "intervals": {k: s["interval"] for k, s in summaries.items()},
            "by_seed": {k: s["seeds"] for k, s in summaries.items()}}


def _mean(xs: list[float | None]) -> float | None:
    return None if any(x is None for x in xs) else float(np.mean(xs))


def _step_summary(boot: Bootstrap, key: str, per_seed: list[dict], labels: pa.Table, problems: list[str]) -> dict:
    """A scorer's step-level numbers over its seeds (one seed for a baseline): means; a bootstrap
    interval over problems and seeds for the accuracies (ratios of counts); per-seed values of
    everything, thresholds included (each seed's own, chosen on validation)."""
    metrics = [s["metrics"] for s in per_seed]
    counts = [step_counts(labels, s["test_rewards"], m["threshold"], problems) for s, m in zip(per_seed, metrics)]
    out = {**metrics[0], "by_kind": {k: dict(v) for k, v in metrics[0]["by_kind"].items()}, "seeds": len(metrics)}
    out["intervals"], out["by_seed"] = {}, {}
    for name in ("f1", "error_accuracy", "correct_accuracy"):
        summ = boot.ratio_summary({c: np.stack([x[c] for x in counts]) for c in STEP_COUNTS},
                                  lambda t, name=name: step_accuracies(t)[name], f"{key}:step")
        out[name], out["intervals"][name], out["by_seed"][name] = summ["mean"], summ["interval"], summ["seeds"]
    for name in ("step_auc", "threshold", "validation_f1"):
        out["by_seed"][name] = [m.get(name) for m in metrics]
        if name != "threshold":
            out[name] = _mean(out["by_seed"][name])
    for kind, v in out["by_kind"].items():
        v["error_accuracy"] = _mean([m["by_kind"][kind]["error_accuracy"] for m in metrics])
        v["f1"] = _mean([m["by_kind"][kind]["f1"] for m in metrics])
    for c in ("error_found", "no_error_found", "predicted_early", "predicted_late"):
        out["by_seed"][c] = [m[c] for m in metrics]
        out[c] = float(np.mean(out["by_seed"][c]))
    return out


def _row_numbers(boot: Bootstrap, name: str, runs: list[tuple[list[str], dict[str, np.ndarray]]],
                 baselines: dict[str, tuple[list[str], dict[str, np.ndarray]]]) -> dict:
    """A row's ``metrics`` (the mean over its seeds), ``intervals``, ``by_seed`` and ``differences``
    (paired, against majority voting and the policy's likelihood) on one test set."""
    ids = baselines["majority"][0]
    for problems, _ in runs:
        if problems != ids:
            raise ValueError(f"{name}: scored on other test problems than the policy baselines ({len(problems)} vs "
                             f"{len(ids)}); every row of a study must score the same test rollouts")
    values = {k: np.stack([v[k] for _, v in runs]) for k in runs[0][1]}
    out = _interval_fields({k: boot.summary(v, name) for k, v in values.items()})
    ns = sorted(int(k.split("@")[1]) for k in values if k.startswith("bon@"))
    out["differences"] = {}
    for n in ns:
        for mine, base, other in ((f"bon@{n}", "majority", f"majority@{n}"), (f"weighted_mv@{n}", "majority",
                                  f"majority@{n}"), (f"bon@{n}", "likelihood", f"bon@{n}")):
            label = f"{mine} - {'policy likelihood ' if base == 'likelihood' else ''}{other}"
            out["differences"][label] = boot.difference(values[mine], baselines[base][1][other], name, base)
    return out


def baseline_numbers(boot: Bootstrap, baselines: dict[str, tuple[list[str], dict[str, np.ndarray]]]) -> dict:
    """The policy-only baselines of one test set: ``baseline`` (pass@k, majority voting) and
    ``baseline_likelihood`` (best-of-N by the policy's likelihood), with ``..._intervals``, and
    the likelihood's paired difference against majority voting."""
    out = {}
    for name, field_name in (("majority", "baseline"), ("likelihood", "baseline_likelihood")):
        summ = {k: boot.summary(v, name) for k, v in baselines[name][1].items()}
        out[field_name] = {k: x["mean"] for k, x in summ.items()}
        out[f"{field_name}_intervals"] = {k: x["interval"] for k, x in summ.items()}
    lik, maj = baselines["likelihood"][1], baselines["majority"][1]
    out["baseline_likelihood_differences"] = {
        f"bon@{k.split('@')[1]} - majority@{k.split('@')[1]}": boot.difference(
            lik[k], maj[f"majority@{k.split('@')[1]}"], "likelihood", "majority")
        for k in lik if k.startswith("bon@")}
    return out


Baselines = dict[str, tuple[list[str], dict[str, np.ndarray]]]


def summarize(cfg: StudyConfig, rows: list[Row], baselines: Baselines, steps: StepTruth | None,
              generator_baselines: dict[str, Baselines] | None = None) -> Bootstrap:
    """Fill every row's numbers (:func:`_row_numbers`) in place: on the study's test set, on each
    other generator's (``generators``), and its ``step_level`` summary; returns the study's
    :class:`Bootstrap` (one set of problem draws, shared by every test set: the same problems)."""
    ids = baselines["majority"][0]
    boot = Bootstrap(len(ids), draws=cfg.intervals.draws, seed=cfg.intervals.seed, level=cfg.intervals.level)
    for row in rows:
        if not row.runs:
            continue
        name = row.result["name"]
        row.result.update(_row_numbers(boot, name, [(r.problems, r.values) for r in row.runs], baselines))
        row.result["aggregations"] = {
            a: _interval_fields({k: boot.summary(np.stack([r.aggregations[a][k] for r in row.runs]), name)
                                 for k in row.runs[0].aggregations[a]})
            for a in row.runs[0].aggregations}
        if generator_baselines:
            row.result["generators"] = {g: _row_numbers(boot, name, [r.generators[g] for r in row.runs], b)
                                        for g, b in generator_baselines.items()}
        if steps is not None:
            row.result["step_level"] = _step_summary(boot, name, [r.step for r in row.runs], steps.test_labels, ids)
    return boot


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------


def _step_report(cfg: StudyConfig, steps: StepTruth | None, rows: list[Row], run_dir: Path, skipped: str | None,
                 boot: Bootstrap, problems: list[str]) -> dict:
    """The study's step-level section: the ground truth, the two baselines (the policy's per-step
    log-likelihood, a random scorer), each scored with its own validation threshold, and the plots
    of every row's first seed (their curves go to ``step_curves.json``)."""
    if steps is None:
        return {"skipped": skipped}
    test_r = {"policy log-likelihood": steps.test_labels.column("likelihood_step_rewards").to_pylist(),
              "random": random_rewards(steps.test_labels, cfg.eval.seed)}
    val_r = {"policy log-likelihood": steps.val_labels.column("likelihood_step_rewards").to_pylist(),
             "random": random_rewards(steps.val_labels, cfg.eval.seed)}
    baselines = {name: step_level(steps.test_labels, test_r[name], val_labels=steps.val_labels,
                                  val_rewards=val_r[name], kinds=steps.kinds) for name in test_r}
    firsts = {r.result["name"]: r.runs[0].step for r in rows if r.runs}
    scorers = {**{n: {"metrics": s["metrics"], "curves": s["curves"]} for n, s in firsts.items()}, **baselines}
    rewards = {**{n: s["test_rewards"] for n, s in firsts.items()}, **test_r}
    plot_step_eval(scorers, steps.test_labels, rewards, run_dir)
    write_json(run_dir / "step_curves.json", {n: s["curves"] for n, s in scorers.items()})
    summaries = {name: _step_summary(boot, name, [{**b, "test_rewards": test_r[name]}], steps.test_labels, problems)
                 for name, b in baselines.items()}
    return {"labels": label_summary(steps.test_labels, steps.kinds),
            "validation_labels": label_summary(steps.val_labels, steps.kinds),
            "validation": {"problems": steps.validation.summary["instructions"],
                           "samples_per_problem": cfg.validation_rollouts.sampling.n},
            "kinds": list(steps.kinds), "baselines": summaries}


def _resolved(cfg: StudyConfig) -> StudyConfig:
    """Absolute paths: Ray actors may run in another working directory (``ray job submit
    --working-dir``), and stage hashes should not depend on how a path was spelled. Precisions:
    ``auto`` resolved for this hardware, so stage hashes and the saved config say what ran."""
    cfg = copy.deepcopy(cfg)
    cfg.train, cfg.eval = cfg.train.resolved(), cfg.eval.resolved()
    cfg.runs_dir = str(Path(cfg.runs_dir).resolve())

    def local(path: str) -> bool:
        return Path(path).exists() or path.startswith((".", "/", "~"))

    if local(cfg.policy) or cfg.bootstrap_if_missing:
        cfg.policy = str(Path(cfg.policy).resolve())
    for name in ("prm_model", "reference_model"):
        if getattr(cfg, name) and local(getattr(cfg, name)):
            setattr(cfg, name, str(Path(getattr(cfg, name)).resolve()))
    for g in cfg.all_generators:
        if g.policy and (local(g.policy) or g.bootstrap):
            g.policy = str(Path(g.policy).resolve())
    return cfg


STUDY_EVAL_DIRS = ("eval", "eval-validation", "eval-generators")


def adopt_study_evaluations(runs_dir: Path, log: Log) -> int:
    """Move the evaluations kept inside study directories (:data:`STUDY_EVAL_DIRS`, where they
    lived before they were shared) to their shared place (:func:`eval_dir`), by the key each
    ``metrics.json`` holds; one already there makes the study's copy a duplicate, removed. An
    unfinished one (no ``metrics.json``) is left to its study directory. Returns how many moved."""
    moved = dropped = 0
    roots = [study / name for study in (runs_dir.iterdir() if runs_dir.is_dir() else ()) for name in STUDY_EVAL_DIRS
             if (study / name).is_dir()]
    for metrics in sorted(m for root in roots for m in root.glob(f"**/{METRICS_FILE}")):
        key = (read_json(metrics) or {}).get("key")
        if not key:
            continue
        src, dest = metrics.parent, eval_dir(runs_dir, key["prm"], key["data"], key["config"])
        if (dest / METRICS_FILE).exists():
            shutil.rmtree(src)
            dropped += 1
            continue
        if dest.exists():
            shutil.rmtree(dest)  # an unfinished evaluation of the same key
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dest)
        moved += 1
    for root in roots:  # the emptied directories, deepest first
        for d in sorted(root.glob("**/"), key=lambda p: -len(p.parts)):
            if not any(d.iterdir()):
                d.rmdir()
    if moved or dropped:
        log(f"evaluations: {moved} moved from study directories to {runs_dir / 'evals'} (shared across studies), "
            f"{dropped} duplicates removed")
    return moved


def claim_study_dir(run_dir: Path, study_key: dict, overwrite: bool) -> None:
    """A study directory made with another config is refused, or with ``overwrite`` emptied (its
    report, plots and settings; its evaluations live in ``<runs_dir>/evals/``, each checking its
    own key, so one whose inputs did not change is reused like any other stage)."""
    old = read_json(run_dir / "study_settings.json")
    if old is None or first_difference(old, study_key) is None:
        return
    if not overwrite:
        check_settings(run_dir, old, study_key, what="a study report")  # raises, naming the field
    for path in run_dir.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_study(cfg: StudyConfig, specs: list[PRMSpec], *, axis_name: str, title: str, log: Log = print) -> dict:
    """Run (or resume) every stage and write ``<runs_dir>/<name>/report.{md,json}`` and the plots.

    A study directory made with another config is refused unless ``cfg.overwrite``.
    """
    explicit = [s.name for s in specs if s.explicit and not s.undefined]
    if explicit and not hasattr(cfg, "shepherd"):
        raise ConfigError(f"rows {explicit} are Math-Shepherd PRMs, which need the step labels of a `shepherd` "
                          f"section; {type(cfg).__name__} has none (use CompareBaselinesConfig)")
    cfg = _resolved(cfg)
    run_dir = Path(cfg.runs_dir) / cfg.name
    study_key = {"config": {k: v for k, v in to_dict(cfg).items() if k not in ("overwrite", "ray_address")},
                 "specs": [to_dict(s) for s in specs]}
    adopt_study_evaluations(Path(cfg.runs_dir), log)
    claim_study_dir(run_dir, study_key, cfg.overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "study_settings.json", study_key)
    save_config(cfg, run_dir / "config.yaml")
    write_json(run_dir / "specs.json", [to_dict(s) for s in specs])
    t_start = time.time()

    records = [policy_stage(cfg, log)]
    params = count_parameters(cfg.policy)
    init_ray(cfg.ray_address)
    # Rollouts: training instructions and held-out test problems (disjoint splits).
    train = rollout_stage(cfg, cfg.train_rollouts, "train rollouts", params, log)
    records.append(train.record)
    # The test responses: the policy's, or another generator's (one column of paper Table 1).
    test_policy, test, test_records = generator_rollouts(cfg, cfg.test_generator, log)
    records += test_records
    # Step labels of the training rollouts (only studies with an explicit PRM): Math-Shepherd's,
    # and the step checker's for an exact-label row.
    labels = {}
    for method in dict.fromkeys(s.label_method for s in specs if s.explicit and not s.undefined):
        labels[method] = shepherd_stage(cfg, train, params, log, method)
        records.append(labels[method].record)
    # Reference log-probs of the test responses, once: the likelihood baseline (the reference
    # itself as the reward model, paper Table 4) and every PRM scored with the reference read them.
    ref_test, record = reference_stage(cfg, test, cfg.eval.dtype, "test", log)
    records.append(record)
    # ... and of the training responses, once for every PRM trained with a reference (each run
    # takes a subset of them), in the training's reference-pass dtype: a cached run must train on
    # the same numbers as an uncached one.
    ref_train = None
    if any(s.uses_reference(cfg)[0] and not s.undefined for s in specs):
        ref_train, record = reference_stage(cfg, train, cfg.train.ref_pass.dtype, "train", log)
        records.append(record)
    # Step-level ground truth of the held-out responses (validation: where thresholds are chosen).
    steps, step_records, no_steps = step_truth_stage(cfg, test, ref_test, params, log)
    records += step_records
    # Other generators' test responses (paper Table 1): every PRM also reranks them.
    generators = []
    for g in cfg.generators:
        gen, gen_records = generator_stage(cfg, g, log)
        generators.append(gen)
        records += gen_records
    inputs = Inputs(params, train, test, labels, ref_test, ref_train, steps, generators)

    # Policy-only baselines from the test rollouts (no PRM): pass@k, majority voting, and
    # best-of-N by the reference policy's own log-likelihood (free: its log-probs are cached).
    def policy_baselines(test_path: Path, ref_path: Path) -> Baselines:
        out = {}
        for name, table in (("majority", _zero_scores(test_path)), ("likelihood", _likelihood_scores(ref_path))):
            problems = problems_from_scores(table, "min")
            out[name] = ([p["instruction_id"] for p in problems], per_problem(problems, cfg.eval))
        return out

    baselines = policy_baselines(test.path, ref_test)
    gen_baselines = {g.name: policy_baselines(g.test.path, g.ref_test) for g in generators}

    rows = []
    for spec in specs:
        row = row_stage(cfg, spec, inputs, log)
        rows.append(row)
        records += row.records
    boot = summarize(cfg, rows, baselines, steps, gen_baselines)
    step_report = _step_report(cfg, steps, rows, run_dir, no_steps, boot, baselines["majority"][0])
    total = time.time() - t_start
    out = {
        "study": cfg.name, "title": title, "axis": axis_name, "headline_n": cfg.headline_n,
        "results": [r.result for r in rows],
        **baseline_numbers(boot, baselines),
        "generators": {g.name: {"policy": g.policy, "temperature": g.temperature, "pass@1": g.test.summary["pass@1"],
                                **baseline_numbers(boot, gen_baselines[g.name])} for g in generators},
        "intervals": {"level": cfg.intervals.level, "draws": cfg.intervals.draws, "seed": cfg.intervals.seed,
                      "method": "percentile bootstrap: test problems resampled (paired across rows), each row's "
                                "training seeds resampled"},
        "config": to_dict(cfg),
        "seeds": {"rollouts_train": cfg.train_rollouts.sampling.seed, "rollouts_test": cfg.test_rollouts.sampling.seed,
                  "training (train.seed = train.dataset.seed)": list(cfg.seeds), "eval": cfg.eval.seed,
                  "policy": cfg.bootstrap.seed, "bootstrap": cfg.intervals.seed},
        "stages": [r.to_json() for r in records], "wall_seconds": total, "policy_params": params,
        "likelihood_model": cfg.reference,
        "prm_params": count_parameters(cfg.prm_base),
        "test": {"problems": test.summary["instructions"], "samples_per_problem": cfg.test_rollouts.sampling.n,
                 "split": cfg.test_rollouts.split, "task": cfg.test_rollouts.task,
                 "generator": cfg.test_generator and {"name": cfg.test_generator.name, "policy": test_policy,
                                                      "temperature": cfg.test_generator.temperature}},
        "train_rollouts": {"instructions": train.summary["instructions"], "responses": train.summary["responses"],
                           "responses_per_instruction": cfg.train_rollouts.sampling.n,
                           "pass@1": train.summary["pass@1"]},
        "step_level": step_report,
        "axis_differences": axis_differences(boot, rows, axis_name),
    }
    write_report(out, run_dir)
    log(f"report: {run_dir / 'report.md'} ({total / 60:.1f} min)")
    return out
