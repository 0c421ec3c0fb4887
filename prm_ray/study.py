"""One experiment runner for the paper's studies: policy -> rollouts -> PRMs -> evaluation -> report.

A study is a list of :class:`PRMSpec` (what to train and how to score it) plus a shared setup
(:class:`StudyConfig`). ``jobs/scale_responses.py``, ``jobs/scale_instructions.py`` and
``jobs/compare_objectives.py`` only build their grid and call :func:`run_study`.

Every stage is reused when its inputs are unchanged: rollouts live under
``<runs_dir>/rollouts/<split>-<hash of their config>``, PRMs under
``<runs_dir>/prms/<name>-<hash of their training config>``, so two studies that need the same
rollouts or the same PRM (e.g. CE with 8 responses per instruction) compute it once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prm_ray.bootstrap import BootstrapConfig
from prm_ray.compute import (
    RolloutTokens,
    count_parameters,
    forward_flops,
    measure,
    stage,
    total_flops,
    train_flops,
)
from prm_ray.config import ConfigError, save_config, to_dict
from prm_ray.evaluate import EvaluateConfig, evaluate_prm, metrics, problems_from_scores, reference_logprobs
from prm_ray.rollout import EngineConfig, RolloutConfig, SamplingConfig, VerifierConfig
from prm_ray.shepherd import ShepherdConfig
from prm_ray.losses import get_objective
from prm_ray.train import TRAIN_REF_DTYPE, TrainConfig

KINDS = ("bon", "weighted_mv", "majority", "pass")


# max_tokens 160: what the default policy was evaluated with (its card); longer arith responses
# are degenerate.
def _train_rollouts() -> RolloutConfig:
    return RolloutConfig(split="train", limit=1000, sampling=SamplingConfig(n=8, max_tokens=160))


def _test_rollouts() -> RolloutConfig:
    return RolloutConfig(split="test", limit=150, shard_size=16, sampling=SamplingConfig(n=64, max_tokens=160))


def _train() -> TrainConfig:
    # Chosen on the validation split, never the test problems (docs/evaluation.md):
    # - one epoch at lr 1e-4 (best-of-16 67.9% against 64.4% for 2 epochs at 5e-4, with the
    #   reference; 78.7% against 73.2% without it at inference);
    # - no reference in training either (paper Table 4, "w/o ref"): 79.7% against 78.7%;
    # (DPO/NCA pairs per instruction: StudyConfig.max_pairs_per_instruction.)
    return TrainConfig(epochs=1, lr=1e-4, reference=False)


def _eval() -> EvaluateConfig:
    # Best-of-N scores drop the reference at inference (paper section 5.3.2): with a strong
    # reference, a good step is likely under both models (ratio near 0) and a bad one unlikely under
    # both (ratio near 0 or above), which confuses response selection. bf16 scoring: 1.5x faster
    # here, best-of-16 on validation 79.3% against 79.7% in fp32 (docs/evaluation.md).
    return EvaluateConfig(reference=False, dtype="bfloat16")


@dataclass
class StudyConfig:
    """The shared setup of a study. The study fills in each stage's paths (``model``, ``out``,
    ``data``) itself; everything else in the nested configs is used as given."""

    name: str = "study"
    runs_dir: str = "runs"
    policy: str = "artifacts/policy"  # a local directory or a Hugging Face model id
    # Train the embedded arith policy into `policy` when that directory has no model (the default
    # world only; set false for a hub model, which is then loaded as given).
    bootstrap_if_missing: bool = True
    reference: str | None = None  # reference model for the implicit reward; None: the policy
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    train_rollouts: RolloutConfig = field(default_factory=_train_rollouts)
    test_rollouts: RolloutConfig = field(default_factory=_test_rollouts)
    train: TrainConfig = field(default_factory=_train)
    eval: EvaluateConfig = field(default_factory=_eval)
    headline_n: int = 16  # the N of the scaling plot and the summary line
    # Pairs per instruction for DPO/NCA (sets train.dataset.max_pairs_per_instruction of paired
    # objectives; null: every correct x incorrect pair, as the paper). 4 keeps about 40% of the pairs
    # at 8 responses per instruction, which the 30-minute budget of the default study needs.
    max_pairs_per_instruction: int | None = 4
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.bootstrap_if_missing and self.train_rollouts.task != "arith":
            self.bootstrap_if_missing = False  # the bootstrap trains the arith policy only
        if self.train_rollouts.split == self.test_rollouts.split and self.train_rollouts.task == self.test_rollouts.task:
            raise ConfigError(f"train_rollouts.split and test_rollouts.split are both {self.test_rollouts.split!r}; "
                              "held-out problems must come from another split")
        if self.headline_n > self.test_rollouts.sampling.n:
            raise ConfigError(f"headline_n ({self.headline_n}) > test_rollouts.sampling.n "
                              f"({self.test_rollouts.sampling.n})")


@dataclass
class PRMSpec:
    """One row of a study: a PRM to train (a delta on ``StudyConfig.train``) and how to score it."""

    name: str
    objective: str = "ce"
    responses_per_instruction: int | None = None
    instruction_fraction: float = 1.0
    balance: str = "none"
    reference_train: bool | None = None  # None: the study's `train.reference`
    reference_infer: bool | None = None  # None: the study's `eval.reference`
    train_overrides: dict[str, Any] = field(default_factory=dict)  # top-level TrainConfig fields for this row
    undefined: str | None = None  # set when the cell does not exist (e.g. DPO with 1 response)
    axis: dict[str, Any] = field(default_factory=dict)  # the study's axis value(s) for plots

    def uses_reference(self, cfg: "StudyConfig") -> tuple[bool, bool]:
        """(in training, at inference): this row's own choice, else the study's. An explicit PRM
        (Math-Shepherd) has no reference model."""
        if get_objective(self.objective).explicit:
            return False, False
        return (cfg.train.reference if self.reference_train is None else self.reference_train,
                cfg.eval.reference if self.reference_infer is None else self.reference_infer)


def _is_local(path: str) -> bool:
    return Path(path).exists() or path.startswith((".", "/", "~"))


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def rollout_dir(cfg: StudyConfig, rc: RolloutConfig) -> Path:
    key = to_dict(rc)
    key.pop("out", None)
    key.pop("progress", None)
    return Path(cfg.runs_dir) / "rollouts" / f"{rc.split}-{_hash(key)}"


def train_config(cfg: StudyConfig, spec: PRMSpec, data: Path, ref_cache: Path | None = None) -> TrainConfig:
    tc = copy.deepcopy(cfg.train)
    for name, value in spec.train_overrides.items():
        if not hasattr(tc, name) or name in ("dataset", "ref_pass"):
            raise ConfigError(f"{spec.name}: train_overrides names {name!r}, not a top-level train field")
        setattr(tc, name, value)
    tc.__post_init__()
    tc.data, tc.model, tc.ref_model = str(data), cfg.policy, cfg.reference
    tc.reference = spec.uses_reference(cfg)[0]
    ds = tc.dataset
    ds.objective, ds.responses_per_instruction = spec.objective, spec.responses_per_instruction
    ds.max_pairs_per_instruction = cfg.max_pairs_per_instruction if get_objective(spec.objective).paired else None
    ds.instruction_fraction, ds.balance = spec.instruction_fraction, spec.balance
    ds.__post_init__()  # validate the combination
    if cfg.ray_address:
        tc.ray_address = cfg.ray_address
    key = to_dict(tc)
    key.pop("out")
    key.pop("ref_cache")  # where the reference log-probs come from does not change the PRM
    tc.out = str(Path(cfg.runs_dir) / "prms" / f"{spec.name}-{_hash(key)}")
    if ref_cache is not None and tc.reference:
        tc.ref_cache = str(ref_cache)
    return tc


def _rollout_stage(cfg: StudyConfig, rc: RolloutConfig, label: str, params: int, log) -> tuple[Path, dict, RolloutTokens]:
    from prm_ray.rollout import run_rollouts

    rc = copy.deepcopy(rc)
    rc.model = cfg.policy
    rc.ray_address = cfg.ray_address or rc.ray_address
    out = rollout_dir(cfg, rc)
    rc.out = str(out)
    log(f"{label}: {rc.limit} {rc.split} instructions x {rc.sampling.n} -> {out}")
    with measure() as m:
        summary = run_rollouts(rc)
    this = summary["this_run"]
    tokens = RolloutTokens(out, cfg.policy)
    stage_ = {"stage": label, "wall_s": m["wall_s"], "cpu_s": m["cpu_s"], "reused": this["shards_done"] == 0,
              "prompt_tokens": tokens.prompt_total, "generated_tokens": summary["generated_tokens_total"],
              "flops": forward_flops(params, tokens.prompt_total + summary["generated_tokens_total"]),
              "instructions": summary["instructions"], "responses": summary["responses"],
              "pass@1": summary["pass@1"], "pass@N": summary["pass@N"],
              "verify_status": summary["verify_status"], "all_runs": summary.get("all_runs")}
    return out, stage_, tokens


def _train_tokens(report: dict, out: Path) -> float:
    """Tokens the PRM was trained on, for the compute estimate: from its training report, or from
    its metrics for a PRM trained before reports carried them."""
    if report.get("compute"):
        return float(report["compute"]["trained_tokens"])
    from prm_ray.train import trained_tokens

    path = out / "metrics.jsonl"
    if not path.exists():
        return float("nan")
    return trained_tokens([json.loads(x) for x in path.read_text().splitlines()])


def run_study(cfg: StudyConfig, specs: list[PRMSpec], *, axis_name: str, title: str, log=print) -> dict:
    """Run (or resume) every stage and write ``<runs_dir>/<name>/report.{md,json}`` and the plots."""
    from prm_ray.bootstrap import bootstrap
    from prm_ray.report import write_report
    from prm_ray.rollout import init_ray
    from prm_ray.train import train_prm

    # Absolute paths: Ray actors may run in another working directory (`ray job submit
    # --working-dir`), and stage hashes should not depend on how a path was spelled.
    cfg = copy.deepcopy(cfg)
    cfg.runs_dir = str(Path(cfg.runs_dir).resolve())
    local = _is_local(cfg.policy) or cfg.bootstrap_if_missing
    if local:
        cfg.policy = str(Path(cfg.policy).resolve())
    if cfg.reference and _is_local(cfg.reference):
        cfg.reference = str(Path(cfg.reference).resolve())
    run_dir = Path(cfg.runs_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "specs.json").write_text(json.dumps([to_dict(s) for s in specs], indent=2))
    t_start = time.time()
    stages: list[dict] = []

    # 1. The policy (shipped in the repo by default: then this costs nothing).
    t0 = time.time()
    if cfg.bootstrap_if_missing and not (Path(cfg.policy) / "config.json").exists():
        log(f"policy: none at {cfg.policy}; training the embedded default policy there (bootstrap)")
        bcfg = copy.deepcopy(cfg.bootstrap)
        bcfg.out = cfg.policy
        card = bootstrap(bcfg)
        stages.append({"stage": "policy", "wall_s": time.time() - t0, "reused": False,
                       "train_seconds": card["train"]["train_seconds"]})
    else:
        stages.append({"stage": "policy", "wall_s": time.time() - t0, "reused": True})
    params = count_parameters(cfg.policy)
    init_ray(cfg.ray_address)

    # 2. Rollouts: training instructions and held-out test problems (disjoint splits).
    train_data, st, train_tokens = _rollout_stage(cfg, cfg.train_rollouts, "train rollouts", params, log)
    stages.append(st)
    test_data, st, test_tokens = _rollout_stage(cfg, cfg.test_rollouts, "test rollouts", params, log)
    stages.append(st)

    # 2b. Math-Shepherd step labels of the training rollouts (only studies with an explicit PRM).
    labels_dir, labels_info = None, None
    if any(get_objective(s.objective).explicit and not s.undefined for s in specs):
        labels_dir, st, labels_info = _shepherd_stage(cfg, train_data, params, log)
        stages.append(st)

    # 3. Reference log-probs of the test responses, once: the likelihood baseline (the reference
    #    itself as the reward model, paper Table 4) and every PRM scored with the reference read them.
    reference = cfg.reference or cfg.policy
    ref_data = test_data / f"ref-logprobs-{_hash([reference, cfg.eval.dtype])}"
    log(f"reference log-probs of the test responses -> {ref_data}")
    info = reference_logprobs(test_data, reference, ref_data, cfg.eval)
    stages.append({"stage": "reference log-probs (test)", "wall_s": 0.0 if info["reused"] else info["seconds"],
                   "reused": info["reused"],
                   "flops": forward_flops(params, test_tokens.prompt_total + stages[2]["generated_tokens"])})

    # ... and of the training responses, once for every PRM trained with a reference (each run
    #     takes a subset of them: k responses, a fraction of instructions, pairs).
    train_ref = None
    #     In float32 whatever eval.dtype says: the training's own reference pass runs in float32,
    #     and a cached run must train on the same numbers as an uncached one.
    if any(s.uses_reference(cfg)[0] and not s.undefined for s in specs):
        train_ref = train_data / f"ref-logprobs-{_hash([reference, TRAIN_REF_DTYPE])}"
        log(f"reference log-probs of the training responses -> {train_ref}")
        info = reference_logprobs(train_data, reference, train_ref, replace(cfg.eval, dtype=TRAIN_REF_DTYPE))
        stages.append({"stage": "reference log-probs (train)", "wall_s": 0.0 if info["reused"] else info["seconds"],
                       "reused": info["reused"], "seconds_when_made": info["seconds"],
                       "flops": forward_flops(params, train_tokens.prompt_total + stages[1]["generated_tokens"])})

    # 4. Policy-only baselines from the test rollouts (no PRM): pass@k, majority voting, and
    #    best-of-N by the reference policy's own log-likelihood (free: its log-probs are cached).
    base_problems = problems_from_scores(_zero_scores(test_data), "min")
    baseline = metrics(base_problems, cfg.eval)
    likelihood = metrics(problems_from_scores(_likelihood_scores(ref_data), "min"), cfg.eval)

    # 5. Train and evaluate every PRM.
    results = []
    for spec in specs:
        train_with_ref, infer_ref = spec.uses_reference(cfg)
        k = spec.responses_per_instruction
        if get_objective(spec.objective).explicit:
            k = cfg.shepherd.responses_per_instruction  # the labelled responses it trains on
        entry = {"name": spec.name, "objective": spec.objective,
                 "responses_per_instruction": k or cfg.train_rollouts.sampling.n,
                 "instruction_fraction": spec.instruction_fraction, "balance": spec.balance,
                 "reference": train_with_ref, "reference_at_inference": infer_ref,
                 "train_overrides": spec.train_overrides, "axis": spec.axis}
        if spec.undefined:
            log(f"{spec.name}: not defined ({spec.undefined})")
            results.append({**entry, "status": "undefined", "reason": spec.undefined, "metrics": None})
            continue
        explicit = get_objective(spec.objective).explicit
        tc = train_config(cfg, spec, labels_dir if explicit else train_data, train_ref)
        log(f"{spec.name}: training -> {tc.out}")
        with measure() as train_time:
            report = train_prm(tc, progress=False)
        _remember_timing(Path(tc.out), "train", train_time, report.get("reused", False))
        tokens = _train_tokens(report, Path(tc.out))
        ecfg = copy.deepcopy(cfg.eval)
        ecfg.reference = infer_ref
        log(f"{spec.name}: evaluating on {stages[2]['instructions']} test problems x "
            f"{cfg.test_rollouts.sampling.n}")
        eval_dir = run_dir / "eval" / spec.name
        with measure() as eval_time:
            ev = evaluate_prm(tc.out, ref_data if infer_ref else test_data, eval_dir, ecfg)
        _remember_timing(eval_dir, "eval", eval_time, ev["reused"])
        m = ev["metrics"]
        log(f"{spec.name}: bon@{cfg.headline_n} {m[f'bon@{cfg.headline_n}']:.3f} "
            f"(majority {m[f'majority@{cfg.headline_n}']:.3f}, pass@1 {m['pass@1']:.3f})")
        ds = report.get("dataset", {})
        compute = prm_compute(
            params=params, dataset=tc.dataset, epochs=tc.epochs, train_tokens=tokens,
            rollouts=train_tokens, rollout_stage=stages[1], labels_dir=labels_dir if explicit else None,
            labels_info=labels_info if explicit else None, reference_train=train_with_ref and not explicit,
            test_tokens=test_tokens, test_stage=stages[2], reference_infer=infer_ref,
            train_timing=_timing(Path(tc.out), "train"), eval_timing=_timing(eval_dir, "eval"))
        stages.append({"stage": f"train {spec.name}", "wall_s": train_time["wall_s"], "cpu_s": train_time["cpu_s"],
                       "reused": report.get("reused", False), "flops": compute["stages"]["training"]["flops"]
                       + compute["stages"].get("reference log-probs", {}).get("flops", 0.0), "train_tokens": tokens})
        stages.append({"stage": f"eval {spec.name}", "wall_s": eval_time["wall_s"], "cpu_s": eval_time["cpu_s"],
                       "reused": ev["reused"], "flops": compute["stages"]["scoring"]["flops"]})
        results.append({**entry, "status": "ok", "prm": tc.out, "metrics": m, "compute": compute,
                        "train": {"examples": report.get("examples"), "steps": report.get("steps"),
                                  "dataset_rows": ds.get("rows_out", ds.get("rows")),
                                  "final_metrics": report.get("final_metrics")},
                        "eval_dir": str(eval_dir)})
    total = time.time() - t_start
    out = {
        "study": cfg.name, "title": title, "axis": axis_name, "headline_n": cfg.headline_n,
        "results": results, "baseline": baseline, "baseline_likelihood": likelihood, "config": to_dict(cfg),
        "seeds": {"rollouts_train": cfg.train_rollouts.sampling.seed, "rollouts_test": cfg.test_rollouts.sampling.seed,
                  "dataset": cfg.train.dataset.seed, "train": cfg.train.seed, "eval": cfg.eval.seed,
                  "policy": cfg.bootstrap.seed},
        "stages": stages, "wall_seconds": total, "policy_params": params,
        "test": {"problems": stages[2]["instructions"], "samples_per_problem": cfg.test_rollouts.sampling.n,
                 "split": cfg.test_rollouts.split, "task": cfg.test_rollouts.task},
        "train_rollouts": {"instructions": stages[1]["instructions"], "responses": stages[1]["responses"],
                           "pass@1": stages[1]["pass@1"]},
    }
    write_report(out, run_dir)
    log(f"report: {run_dir / 'report.md'} ({total / 60:.1f} min)")
    return out


def _shepherd_stage(cfg: StudyConfig, train_data: Path, params: int, log) -> tuple[Path, dict, dict]:
    """Math-Shepherd step labels of the training rollouts (``cfg.shepherd``), keyed like a rollout set."""
    from prm_ray.datasets import load_rollouts
    from prm_ray.shepherd import run_shepherd

    sc = copy.deepcopy(cfg.shepherd)
    sc.rollouts, sc.model = str(train_data), cfg.policy
    # Left at their defaults, the completions run on the training rollouts' engine and verifier
    # pools: the same policy sampling the same kind of text (on a cluster: the GPU nodes).
    if sc.engine == EngineConfig():
        sc.engine = copy.deepcopy(cfg.train_rollouts.engine)
    if sc.verifier == VerifierConfig():
        sc.verifier = copy.deepcopy(cfg.train_rollouts.verifier)
    sc.ray_address = cfg.ray_address or sc.ray_address
    key = to_dict(sc)
    for name in ("out", "progress"):
        key.pop(name, None)
    out = Path(cfg.runs_dir) / "shepherd" / f"{train_data.name}-{_hash(key)}"
    sc.out = str(out)
    log(f"Math-Shepherd labels: {sc.completions_per_step} completions per step of "
        f"{sc.responses_per_instruction or 'all'} responses per instruction -> {out}")
    with measure() as m:
        summary = run_shepherd(sc)
    lab = load_rollouts(out, columns=["completion_prompt_tokens", "completion_generated_tokens"])
    prompt, generated = (sum(lab.column(c).to_pylist()) for c in lab.column_names)
    return out, {"stage": "Math-Shepherd step labels", "wall_s": m["wall_s"], "cpu_s": m["cpu_s"],
                 "reused": bool(summary.get("reused")), "prompt_tokens": prompt, "generated_tokens": generated,
                 "flops": forward_flops(params, prompt + generated), "responses": lab.num_rows}, summary


def _remember_timing(where: Path, name: str, m: dict, reused: bool) -> None:
    """Keep a stage's measured seconds next to its output, so a later run that reuses the output
    can still report what it cost."""
    if not reused and where.exists():
        (where / f"timing-{name}.json").write_text(json.dumps(m))


def _timing(where: Path, name: str) -> dict | None:
    path = where / f"timing-{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    report = where / "train_report.json"  # PRMs trained before timings were kept: wall time only
    if name == "train" and report.exists():
        return {"wall_s": sum(json.loads(report.read_text()).get("timings", {}).values()), "cpu_s": None}
    return None


def _scaled(value: float | None, share: float) -> float | None:
    return None if value is None else value * share


def prm_compute(*, params: int, dataset, epochs: int, train_tokens: float, rollouts: RolloutTokens,
                rollout_stage: dict, labels_dir: Path | None, labels_info: dict | None, reference_train: bool,
                test_tokens: RolloutTokens, test_stage: dict, reference_infer: bool,
                train_timing: dict | None, eval_timing: dict | None) -> dict:
    """What one PRM cost, stage by stage (formulas: ``prm_ray.compute``).

    * generation: the training responses its data is built from (its k responses of its
      instructions; for Math-Shepherd, the labelled responses), prompt and generated tokens;
    * verification: the same responses (no FLOPs; verifier busy seconds, which overlap generation);
    * step-label completions / verification (Math-Shepherd only): K completions per step boundary;
    * reference log-probs (trained with the reference only): one forward over those sequences;
    * training: 6 x params x trained tokens; scoring: the held-out responses, once per model.

    A shared stage's seconds are charged in proportion to the tokens this PRM uses of it.
    ``build_flops`` leaves out scoring (the paper's cost of a PRM: data collection and training).
    """
    from prm_ray.datasets import load_rollouts

    if labels_dir is not None:
        lab = load_rollouts(labels_dir, columns=["instruction_id", "sample_index", "completion_prompt_tokens",
                                                 "completion_generated_tokens", "step_completions"])
        rows = rollouts.rows_with_keys(set(zip(lab.column("instruction_id").to_pylist(),
                                               lab.column("sample_index").to_pylist())))
    else:
        rows = rollouts.rows_for(dataset)
    p_tok, g_tok = rollouts.count(rows)
    runs = rollout_stage.get("all_runs") or {}
    share = (p_tok + g_tok) / max(1, rollouts.prompt_total + rollout_stage["generated_tokens"])
    stages = {
        "generation": stage(forward_flops(params, p_tok + g_tok), wall_s=_scaled(runs.get("wall_seconds"), share),
                            cpu_s=_scaled(runs.get("cpu_seconds"), share), prompt_tokens=p_tok,
                            generated_tokens=g_tok, responses=len(rows)),
        "verification": stage(0.0, wall_s=_scaled(runs.get("verify_seconds"), share), responses=len(rows)),
    }
    if labels_dir is not None:
        cp = sum(lab.column("completion_prompt_tokens").to_pylist())
        cg = sum(lab.column("completion_generated_tokens").to_pylist())
        completions = sum(sum(c[:-1]) for c in lab.column("step_completions").to_pylist())  # the last step samples none
        totals = ((labels_info or {}).get("timing") or {}).get("total") or {}
        stages["step-label completions"] = stage(
            forward_flops(params, cp + cg), wall_s=totals.get("wall_seconds"), cpu_s=totals.get("cpu_seconds"),
            prompt_tokens=cp, generated_tokens=cg, completions=completions)
        stages["step-label verification"] = stage(0.0, wall_s=totals.get("verify_seconds"), completions=completions)
    if reference_train:
        stages["reference log-probs"] = stage(forward_flops(params, p_tok + g_tok), tokens=p_tok + g_tok)
    stages["training"] = stage(train_flops(params, train_tokens), **(train_timing or {}), tokens=train_tokens,
                               epochs=epochs)
    t_tok = test_tokens.prompt_total + test_stage["generated_tokens"]
    forwards = 2 if reference_infer else 1
    stages["scoring"] = stage(forwards * forward_flops(params, t_tok), **(eval_timing or {}), tokens=t_tok,
                              responses=test_stage["responses"], forwards_per_token=forwards)
    total = total_flops(stages)
    return {"params": params, "stages": stages, "total_flops": total,
            "build_flops": total - stages["scoring"]["flops"]}


def _zero_scores(test_data: Path):
    """The test rollouts as a score table with all-zero scores (voting/pass@k ignore the score)."""
    import pyarrow as pa

    from prm_ray.datasets import load_rollouts

    t = load_rollouts(test_data, columns=["instruction_id", "sample_index", "correct", "extracted_answer"])
    return t.append_column("score_min", pa.array([0.0] * t.num_rows, pa.float64()))


def _likelihood_scores(ref_data: Path):
    """Test responses scored by the reference policy's log-likelihood (sum over response tokens)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    t = pads.dataset(str(ref_data / "data"), format="parquet").to_table(
        columns=["instruction_id", "sample_index", "correct", "extracted_answer", "ref_token_logp"])
    sums = [float(sum(v)) for v in t.column("ref_token_logp").to_pylist()]
    return t.drop_columns(["ref_token_logp"]).append_column("score_min", pa.array(sums, pa.float64()))


# ---------------------------------------------------------------------------------------------
# The three studies (paper Figure 5, Figure 4, Tables 1 and 4)
# ---------------------------------------------------------------------------------------------

PAIRED = ("dpo", "nca")


@dataclass
class ScaleResponsesConfig(StudyConfig):
    """Figure 5: PRMs trained on the first k responses per instruction, for each objective."""

    name: str = "scale_responses"
    responses: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    objectives: list[str] = field(default_factory=lambda: ["ce", "dpo"])

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.train_rollouts.sampling.n
        if not self.responses or any(k < 1 or k > n for k in self.responses):
            raise ConfigError(f"responses must be in 1..train_rollouts.sampling.n ({n}), got {self.responses}")


def scale_responses_specs(cfg: ScaleResponsesConfig) -> list[PRMSpec]:
    specs = []
    for obj in cfg.objectives:
        for k in cfg.responses:
            spec = PRMSpec(f"{obj}-k{k}", objective=obj, responses_per_instruction=k,
                           axis={"responses_per_instruction": k, "series": obj})
            if obj in PAIRED and k == 1:
                spec.undefined = (f"{obj.upper()} needs a correct and an incorrect response to the same "
                                  "instruction; with 1 response per instruction there are no pairs")
            specs.append(spec)
    return specs


@dataclass
class ScaleInstructionsConfig(StudyConfig):
    """Figure 4: PRMs trained on a seeded fraction of the instructions (all their responses)."""

    name: str = "scale_instructions"
    fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    objectives: list[str] = field(default_factory=lambda: ["ce"])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"fractions must be in (0, 1], got {self.fractions}")


def scale_instructions_specs(cfg: ScaleInstructionsConfig) -> list[PRMSpec]:
    return [PRMSpec(f"{obj}-f{int(round(100 * f))}", objective=obj, instruction_fraction=f,
                    axis={"instruction_fraction": f, "series": obj})
            for obj in cfg.objectives for f in cfg.fractions]


@dataclass
class CompareObjectivesConfig(StudyConfig):
    """Table 1 (objectives and balancing) and Table 4 (reference model at training / inference)."""

    name: str = "compare_objectives"
    objectives: list[str] = field(default_factory=lambda: ["ce", "ce-dataset", "ce-instruction", "dpo", "kto", "nca"])
    reference_ablation: bool = True  # Table 4: CE with the reference on/off at training x inference

    def __post_init__(self) -> None:
        super().__post_init__()
        valid = {"ce", "ce-dataset", "ce-instruction", "dpo", "kto", "nca"}
        bad = [o for o in self.objectives if o not in valid]
        if bad:
            raise ConfigError(f"objectives {bad} unknown; valid: {sorted(valid)}")


def compare_objectives_specs(cfg: CompareObjectivesConfig) -> list[PRMSpec]:
    specs = []
    for name in cfg.objectives:
        obj, _, balance = name.partition("-")
        specs.append(PRMSpec(name, objective=obj, balance=balance or "none", axis={"objective": name}))
    if cfg.reference_ablation:
        for train_ref in (True, False):
            for infer_ref in (True, False):
                if train_ref == cfg.train.reference and infer_ref == cfg.eval.reference and "ce" in cfg.objectives:
                    continue  # the plain CE row above
                label = f"ce ref train={'on' if train_ref else 'off'} infer={'on' if infer_ref else 'off'}"
                specs.append(PRMSpec(label.replace(" ", "_").replace("=", "-"), objective="ce",
                                     reference_train=train_ref, reference_infer=infer_ref,
                                     axis={"reference (train/inference)": f"{int(train_ref)}/{int(infer_ref)}",
                                           "series": "ce"}))
    return specs


def _shepherd() -> ShepherdConfig:
    # K = 8 completions per step as in the paper. 2 of the 8 responses per instruction: labelling
    # samples about 8 completions x 3.5 boundaries x 48 tokens per response, ~14x the response
    # itself, so all 8000 default responses would take about an hour on 2 CPU cores; 2000 take ~15 min.
    return ShepherdConfig(responses_per_instruction=2)


@dataclass
class CompareBaselinesConfig(StudyConfig):
    """Figures 1 and 3: the implicit PRM against a Math-Shepherd PRM, accuracy next to compute."""

    name: str = "compare_baselines"
    objectives: list[str] = field(default_factory=lambda: ["ce", "dpo"])  # implicit PRMs
    responses: list[int] = field(default_factory=lambda: [2, 8])  # their responses per instruction
    shepherd_labels: list[str] = field(default_factory=lambda: ["hard", "soft"])
    # The explicit PRMs' learning rate and epochs (null: the study's `train` values, which were
    # chosen for the implicit PRM). Chosen on the validation split among lr {1e-4, 1e-3} x epochs
    # {1, 3} for Math-Shepherd-hard: best-of-16 39.6 / 42.6 / 45.9 / 48.5 (docs/baselines.md).
    shepherd_lr: float | None = 1e-3
    shepherd_epochs: int | None = 3
    # The study sets `rollouts`, `model` and `out`. `engine` and `verifier` left at their defaults
    # mean the training rollouts' pools.
    shepherd: ShepherdConfig = field(default_factory=_shepherd)

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [o for o in self.objectives if o not in ("ce", "dpo", "kto", "nca")]
        if bad:
            raise ConfigError(f"objectives: {bad} are not implicit-PRM objectives (ce, dpo, kto, nca)")
        bad = [x for x in self.shepherd_labels if x not in ("hard", "soft")]
        if bad:
            raise ConfigError(f"shepherd_labels must be 'hard' and/or 'soft', got {bad}")
        n = self.train_rollouts.sampling.n
        if any(k < 1 or k > n for k in self.responses):
            raise ConfigError(f"responses must be in 1..train_rollouts.sampling.n ({n}), got {self.responses}")


def compare_baselines_specs(cfg: CompareBaselinesConfig) -> list[PRMSpec]:
    specs = scale_responses_specs(ScaleResponsesConfig(responses=cfg.responses, objectives=cfg.objectives,
                                                       train_rollouts=cfg.train_rollouts))
    for spec in specs:
        spec.axis = {"method": f"implicit {spec.objective}", "series": "implicit PRM"}
    overrides = {k: v for k, v in (("lr", cfg.shepherd_lr), ("epochs", cfg.shepherd_epochs)) if v is not None}
    for kind in cfg.shepherd_labels:
        specs.append(PRMSpec(f"math-shepherd-{kind}", objective=f"math-shepherd-{kind}", train_overrides=overrides,
                             axis={"method": f"Math-Shepherd ({kind})", "series": "Math-Shepherd"}))
    return specs
