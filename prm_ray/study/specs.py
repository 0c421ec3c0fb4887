"""What a study is: its shared setup (:class:`StudyConfig`), its rows (:class:`PRMSpec`), and the
paper's four studies as configs plus the grid of rows each one builds.

* ``scale_responses``: Figure 5, PRMs on the first k responses per instruction;
* ``scale_instructions``: Figure 4, PRMs on a fraction of the instructions;
* ``compare_objectives``: Tables 1 and 4, objectives, balancing and the reference model;
* ``compare_baselines``: Figures 1 and 3, the implicit PRM against Math-Shepherd, with compute.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from prm_ray.config import ConfigError, param, to_dict
from prm_ray.core.objectives import IMPLICIT_OBJECTIVES, get_objective
from prm_ray.policy.bootstrap import BootstrapConfig
from prm_ray.resources import Request, resolve_dtype
from prm_ray.stages.evaluate import EvaluateConfig
from prm_ray.stages.rollout import RolloutConfig, SamplingConfig
from prm_ray.stages.shepherd import ShepherdConfig
from prm_ray.stages.train.config import TrainConfig
from prm_ray.stages.train.driver import settings as train_settings
from prm_ray.stages.train.examples import BALANCE_MODES, DatasetConfig

__all__ = ["AGGREGATIONS_COMPARED", "CompareBaselinesConfig", "CompareObjectivesConfig", "GeneratorConfig", "IntervalConfig", "PRMSpec", "ScaleInstructionsConfig",
           "ScaleResponsesConfig", "StudyConfig", "compare_baselines_specs", "compare_objectives_specs",
           "eval_dir", "reference_dir", "rollout_dir", "sampling_key", "scale_instructions_specs", "scale_responses_specs", "stage_hash", "train_config"]


# max_tokens 160: what the default policy was evaluated with (its card); longer arith responses
# are degenerate.
AGGREGATIONS_COMPARED: dict[bool, tuple[str, ...]] = {False: ("min", "sum", "mean", "last"),
                                                      True: ("min", "prod", "last", "mean")}
"""The aggregations whose best-of-N every study reports next to its own (``eval.aggregation``),
by whether the PRM is explicit: an implicit PRM's step rewards are log-ratios (``sum``: the
outcome reward), an explicit PRM's probabilities (``prod``: PRM800K's product)."""


def _train_rollouts() -> RolloutConfig:
    return RolloutConfig(split="train", limit=1000, sampling=SamplingConfig(n=8, max_tokens=160))


def _test_rollouts() -> RolloutConfig:
    # The whole test split (500 problems): one accuracy's standard error is about 2 points there,
    # against 3.6 at 150 (make demo keeps 150: docs/evaluation.md).
    return RolloutConfig(split="test", limit=500, shard_size=16, sampling=SamplingConfig(n=64, max_tokens=160))


def _validation_rollouts() -> RolloutConfig:
    # Where the step-level thresholds are chosen (never on the test problems); fewer samples than
    # the test set: a threshold needs responses with and without a wrong step, not 64 per problem.
    return RolloutConfig(split="validation", limit=150, shard_size=16, sampling=SamplingConfig(n=8, max_tokens=160))


def _train() -> TrainConfig:
    # Chosen on the validation split, never the test problems (docs/evaluation.md):
    # - one epoch at lr 1e-4 (best-of-16 67.9% against 64.4% for 2 epochs at 5e-4, with the
    #   reference; 78.7% against 73.2% without it at inference);
    # - no reference in training either (paper Table 4, "w/o ref"): 79.7% against 78.7%;
    # - beta 1.0, not the paper's 0.05 (configs/levers/validation-beta.yaml, 3 seeds x 500
    #   validation problems): best-of-16 80.7% against 75.8% (0.5: 80.7%, 2: 80.3%). Without the
    #   reference beta x log pi(y) <= 0, and at 0.05 CE's sigmoid puts right and wrong responses
    #   near 0.5 alike: training then lowered best-of-16 below the untrained likelihood's (80.2%).
    # (DPO/NCA pairs per instruction: StudyConfig.max_pairs_per_instruction.)
    return TrainConfig(epochs=1, lr=1e-4, use_reference=False, beta=1.0)


def _eval() -> EvaluateConfig:
    # Best-of-N scores drop the reference at inference (paper section 5.3.2): with a strong
    # reference, a good step is likely under both models (ratio near 0) and a bad one unlikely under
    # both (ratio near 0 or above), which confuses response selection. dtype auto: bf16 where the
    # hardware has it (on an AVX512-BF16 CPU 1.5x faster than fp32, best-of-16 on validation 79.3%
    # against 79.7% in fp32: docs/evaluation.md), fp32 on CPUs that would emulate it.
    return EvaluateConfig(use_reference=False)


@dataclass
class IntervalConfig:
    """The confidence intervals of a study's numbers (:mod:`prm_ray.core.stats`)."""

    level: float = param(0.95, "the intervals' coverage")
    draws: int = param(2000, "bootstrap draws (problems resampled with replacement, paired across rows; each "
                             "row's training seeds resampled with replacement)")
    seed: int = param(0, "seed of the bootstrap draws")

    def __post_init__(self) -> None:
        if not 0 < self.level < 1:
            raise ConfigError(f"intervals.level must be in (0, 1), got {self.level}")
        if self.draws < 100:
            raise ConfigError(f"intervals.draws must be >= 100 (a percentile interval needs draws in its tails), "
                              f"got {self.draws}")


@dataclass
class GeneratorConfig:
    """Another generator whose test responses every PRM of the study also reranks, as the paper
    scores the responses of three generation models with one PRM (Table 1). The PRMs are still
    trained on, and take their reference from, the study's policy."""

    name: str = param("other", "its column in the report")
    policy: str | None = param(None, "its model: a local directory or a Hugging Face model id; null: the study's "
                                     "policy, or the one `bootstrap` makes")
    bootstrap: dict[str, Any] = param(factory=dict, help="arith world: changes to the study's `bootstrap` config "
                                                          "(e.g. {steps: 300, eval: {temperature: 1.4}}) for a policy "
                                                          "trained into <runs_dir>/generators/ (with `policy`: there, "
                                                          "when it has no model)")
    temperature: float | None = param(None, "its sampling temperature; null: the test rollouts' (itself null: the "
                                            "policy card's)")

    def __post_init__(self) -> None:
        if self.policy is None and self.temperature is None and not self.bootstrap:
            raise ConfigError(f"generators: {self.name!r} has neither a policy, a bootstrap nor a temperature of its "
                              "own: it would be the study's policy again")


@dataclass
class StudyConfig:
    """The shared setup of a study. The study fills in each stage's paths (``model``, ``out``,
    ``data``) itself; everything else in the nested configs is used as given."""

    name: str = param("study", "the study's directory under runs_dir (report, plots, config)")
    runs_dir: str = param("runs", "where every stage's output is kept and reused (on a cluster: storage every "
                                  "node mounts)")
    policy: str = param("artifacts/policy", "the policy: a local directory or a Hugging Face model id")
    bootstrap_if_missing: bool = param(True, "train the embedded arith policy into `policy` when that directory "
                                             "has no model (the arith world only)")
    prm_model: str | None = param(None, "the model every PRM starts from; null: the policy. Another model (a "
                                        "larger one: jobs/bootstrap_policy.py --model.*) must share the "
                                        "policy's tokenizer; it is also the reference unless reference_model")
    reference_model: str | None = param(None, "the implicit reward's reference model (and the likelihood "
                                              "baseline's); null: prm_model, else the policy")
    bootstrap: BootstrapConfig = param(factory=BootstrapConfig, help="")
    train_rollouts: RolloutConfig = param(factory=_train_rollouts, help="")
    test_rollouts: RolloutConfig = param(factory=_test_rollouts, help="")
    validation_rollouts: RolloutConfig = param(factory=_validation_rollouts, help="")
    test_generator: GeneratorConfig | None = param(None, "the generator of the test responses in place of the "
                                                         "policy, as an entry of `generators`: one column of "
                                                         "paper Table 1 per study, the PRMs, their training and "
                                                         "validation unchanged; null: the policy")
    generators: list[GeneratorConfig] = param(factory=list, help="other generators whose test responses every PRM "
                                                                 "also reranks (paper Table 1; YAML only): each "
                                                                 "`name`, `policy`, `bootstrap`, `temperature`")
    step_eval: bool = param(True, "the step-level table: does each reward model's step reward find the first wrong "
                                  "step (needs a task with a step checker: arith; thresholds chosen on "
                                  "validation_rollouts)")
    train: TrainConfig = param(factory=_train, help="")
    seeds: list[int] = param(factory=lambda: [0, 1, 2],
                             help="every PRM is trained once per seed (its train.seed and train.dataset.seed, "
                                  "which replace the ones given there); reports give the mean over seeds with a "
                                  "confidence interval over seeds and test problems")
    intervals: IntervalConfig = param(factory=IntervalConfig, help="")
    eval: EvaluateConfig = param(factory=_eval, help="")
    headline_n: int = param(16, "the N of the scaling plot and the summary line")
    max_pairs_per_instruction: int | None = param(4, "DPO/NCA pairs per instruction (null: every correct x "
                                                     "incorrect pair, as the paper); 4 keeps about 40% of the "
                                                     "pairs at 8 responses per instruction, which the default "
                                                     "study's 30-minute budget needs")
    overwrite: bool = param(False, "replace this study's report made with another config (else refused); every "
                                   "stage whose inputs did not change is reused, evaluations included, and any other "
                                   "redone")
    ray_address: str | None = param(None, "null: RAY_ADDRESS, a running local cluster, or a new one")

    @property
    def prm_base(self) -> str:
        """The model every PRM starts from."""
        return self.prm_model or self.policy

    @property
    def all_generators(self) -> list[GeneratorConfig]:
        """``generators`` and the ``test_generator`` (if any): every generator the study samples."""
        return self.generators + ([self.test_generator] if self.test_generator else [])

    @property
    def reference(self) -> str:
        """The implicit reward's reference: the PRM's own starting point unless named (the paper)."""
        return self.reference_model or self.prm_base

    def __post_init__(self) -> None:
        if self.bootstrap_if_missing and self.train_rollouts.task != "arith":
            self.bootstrap_if_missing = False  # the bootstrap trains the arith policy only
        if self.train_rollouts.split == self.test_rollouts.split and self.train_rollouts.task == self.test_rollouts.task:
            raise ConfigError(f"train_rollouts.split and test_rollouts.split are both {self.test_rollouts.split!r}; "
                              "held-out problems must come from another split")
        if self.step_eval and self.validation_rollouts.split in (self.train_rollouts.split, self.test_rollouts.split):
            raise ConfigError(f"validation_rollouts.split is {self.validation_rollouts.split!r}, a split the study "
                              "trains or tests on; step-level thresholds must be chosen on other problems")
        names = [g.name for g in self.all_generators]
        if len(set(names)) != len(names) or "policy" in names:
            raise ConfigError(f"generators and test_generator: names must be distinct and not 'policy' (the study's "
                              f"own), got {names}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) \
                or any(isinstance(x, bool) or not isinstance(x, int) for x in self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        if self.headline_n > self.test_rollouts.sampling.n:
            raise ConfigError(f"headline_n ({self.headline_n}) > test_rollouts.sampling.n "
                              f"({self.test_rollouts.sampling.n})")
        # Each row sets these on its copy of `train` (train_config): a value here would be
        # overwritten without a word, e.g. instruction_fraction in a compare_objectives config.
        default = DatasetConfig()
        per_row = [f"dataset.{f}" for f in ("objective", "responses_per_instruction", "instruction_fraction", "balance",
                                            "max_pairs_per_instruction", "seed")
                   if getattr(self.train.dataset, f) != getattr(default, f)]
        if per_row or self.train.seed != TrainConfig().seed:
            raise ConfigError(f"train.{(per_row or ['seed'])[0]}: a study sets it per row (objectives, responses, "
                              "fractions, seeds; max_pairs_per_instruction at the top level); leave it at its default")

    def resource_requests(self) -> list[Request]:
        """Each stage's request (the study runs them one after another)."""
        return (self.train_rollouts.resource_requests("train_rollouts.")
                + self.test_rollouts.resource_requests("test_rollouts.")
                + (self.validation_rollouts.resource_requests("validation_rollouts.") if self.step_eval else [])
                + self.train.resource_requests("train.") + [self.eval.request("eval")])

    def cluster_problems(self) -> list[str]:
        """Settings no cluster can make work."""
        if Path(self.runs_dir).is_absolute():
            return []
        return [f"runs_dir {self.runs_dir!r} is relative: under `ray job submit` it resolves inside the job's "
                "working directory on the head node, which worker nodes never see; use a path on storage "
                "every node mounts (e.g. /mnt/shared/prm-ray/runs)"]


@dataclass
class PRMSpec:
    """One row of a study: a PRM to train (a delta on ``StudyConfig.train``) and how to score it."""

    name: str
    objective: str = "ce"
    responses_per_instruction: int | None = None
    instruction_fraction: float = 1.0
    balance: str = "none"
    reference_train: bool | None = None  # None: the study's `train.use_reference`
    reference_infer: bool | None = None  # None: the study's `eval.use_reference`
    label_method: str = "monte_carlo"  # an explicit PRM's step labels (ShepherdConfig.method)
    train_overrides: dict[str, Any] = field(default_factory=dict)  # top-level TrainConfig fields for this row
    undefined: str | None = None  # set when the cell does not exist (e.g. DPO with 1 response)
    axis: dict[str, Any] = field(default_factory=dict)  # the study's axis value(s) for plots

    @property
    def explicit(self) -> bool:
        return get_objective(self.objective).explicit

    def uses_reference(self, cfg: StudyConfig) -> tuple[bool, bool]:
        """(in training, at inference): this row's own choice, else the study's. An explicit PRM
        (Math-Shepherd) has no reference model."""
        if self.explicit:
            return False, False
        return (cfg.train.use_reference if self.reference_train is None else self.reference_train,
                cfg.eval.use_reference if self.reference_infer is None else self.reference_infer)


def stage_hash(obj: Any) -> str:
    """A short content hash: stage outputs live under ``<name>-<hash of their settings>``, so two
    studies that need the same rollouts or the same PRM compute it once."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def sampling_key(rc: RolloutConfig | ShepherdConfig) -> dict:
    """The settings that decide a sampling stage's output (rollouts, Math-Shepherd completions),
    with ``engine.dtype`` as ``auto`` resolves here: bf16 and fp32 engines sample different
    responses from the same seeds, so a CPU with native bf16 must not reuse a set made in fp32."""
    key = to_dict(rc)
    for name in ("out", "progress", "overwrite"):
        key.pop(name)
    key["engine"]["dtype"] = resolve_dtype(rc.engine.dtype, rc.engine.num_gpus)
    return key


def rollout_dir(cfg: StudyConfig, rc: RolloutConfig) -> Path:
    return Path(cfg.runs_dir) / "rollouts" / f"{rc.split}-{stage_hash(sampling_key(rc))}"


REFERENCE_PREFIX = "ref-logprobs-"  # a reference pass's directory, beside its rollouts


def reference_dir(cfg: StudyConfig, rollouts: Path, dtype: str, step_split: str = "blank_line") -> Path:
    """Where a study keeps the per-token reference log-probs of a rollout set (beside it)."""
    key = [cfg.reference, dtype] + ([step_split] if step_split != "blank_line" else [])
    return Path(rollouts) / f"{REFERENCE_PREFIX}{stage_hash(key)}"


def eval_dir(runs_dir: str | Path, prm: str | Path, data: str | Path, config: dict) -> Path:
    """Where the evaluation of one PRM on one rollout set (or its reference pass) under one
    evaluation config (``to_dict`` of the resolved :class:`EvaluateConfig`) lives:
    ``<runs_dir>/evals/<prm>/<rollouts>-<hash of the three>``. Keyed like ``evaluate_prm``'s own
    reuse check rather than by study, so a study that reranks another's test responses with the
    same PRMs (Table 1's parts, compare_baselines' ``generators``) scores nothing twice."""
    prm, data = Path(prm).resolve(), Path(data).resolve()
    rollouts = data.parent if data.name.startswith(REFERENCE_PREFIX) else data
    return Path(runs_dir) / "evals" / prm.name / f"{rollouts.name}-{stage_hash([str(prm), str(data), config])}"


def train_config(cfg: StudyConfig, spec: PRMSpec, data: Path, ref_cache: Path | None = None,
                 seed: int | None = None) -> TrainConfig:
    """The training config of one row and seed (None: the first of ``cfg.seeds``): the study's
    ``train`` with the row's changes, its data and an output directory named by the hash of its
    settings."""
    tc = copy.deepcopy(cfg.train)
    tc.seed = tc.dataset.seed = cfg.seeds[0] if seed is None else seed
    for name, value in spec.train_overrides.items():
        if not hasattr(tc, name) or name in ("dataset", "ref_pass", "workers"):
            raise ConfigError(f"{spec.name}: train_overrides names {name!r}, not a top-level train field")
        setattr(tc, name, value)
    tc.__post_init__()
    tc.data, tc.model, tc.reference_model = str(data), cfg.prm_base, cfg.reference_model
    tc.use_reference = spec.uses_reference(cfg)[0]
    ds = tc.dataset
    ds.objective, ds.responses_per_instruction = spec.objective, spec.responses_per_instruction
    if not spec.explicit and ds.responses_per_instruction is None:
        # "All n responses" named as k = n: the same examples, so the same PRM directory as a
        # scale_responses row at k = n (compare_objectives' ce is scale_responses' ce-k8).
        ds.responses_per_instruction = cfg.train_rollouts.sampling.n
    ds.max_pairs_per_instruction = cfg.max_pairs_per_instruction if get_objective(spec.objective).paired else None
    ds.instruction_fraction, ds.balance = spec.instruction_fraction, spec.balance
    ds.__post_init__()  # validate the combination
    if cfg.ray_address:
        tc.ray_address = cfg.ray_address
    # Named by what it trains on, not by the row: rows of two studies with the same settings
    # (scale_responses' ce-k8, compare_objectives' ce) are one directory.
    name = "-".join([ds.objective] + ([ds.balance] if ds.balance != "none" else [])
                    + ([f"k{ds.responses_per_instruction}"] if ds.responses_per_instruction is not None else [])
                    + ([f"f{round(100 * ds.instruction_fraction)}"] if ds.instruction_fraction != 1.0 else []))
    tc.out = str(Path(cfg.runs_dir) / "prms" / f"{name}-{stage_hash(train_settings(tc))}")
    if ref_cache is not None and tc.use_reference:
        tc.ref_cache = str(ref_cache)
    return tc


# ---------------------------------------------------------------------------------------------
# The three studies (paper Figure 5, Figure 4, Tables 1 and 4)
# ---------------------------------------------------------------------------------------------

def check_implicit(objectives: list[str]) -> None:
    """Refuse a study's ``objectives`` that are not implicit-PRM objectives: an explicit PRM needs
    Math-Shepherd step labels, which only compare_baselines makes (its ``shepherd`` section)."""
    bad = [o for o in objectives if o not in IMPLICIT_OBJECTIVES]
    if bad:
        raise ConfigError(f"objectives: {bad} are not implicit-PRM objectives ({', '.join(IMPLICIT_OBJECTIVES)}); "
                          "Math-Shepherd PRMs need step labels: compare them with the compare_baselines study")


@dataclass
class ScaleResponsesConfig(StudyConfig):
    """Figure 5: PRMs trained on the first k responses per instruction, for each objective."""

    name: str = "scale_responses"
    responses: list[int] = param(factory=lambda: [1, 2, 4, 8], help="the k of the PRMs (first k responses per "
                                                                    "instruction)")
    objectives: list[str] = param(factory=lambda: ["ce", "dpo"], help="implicit objectives, one series each")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_implicit(self.objectives)
        n = self.train_rollouts.sampling.n
        if not self.responses or any(k < 1 or k > n for k in self.responses):
            raise ConfigError(f"responses must be in 1..train_rollouts.sampling.n ({n}), got {self.responses}")


def scale_responses_specs(cfg: ScaleResponsesConfig) -> list[PRMSpec]:
    specs = []
    for obj in cfg.objectives:
        for k in cfg.responses:
            spec = PRMSpec(f"{obj}-k{k}", objective=obj, responses_per_instruction=k,
                           axis={"responses_per_instruction": k, "series": obj})
            if get_objective(obj).paired and k == 1:
                spec.undefined = (f"{obj.upper()} needs a correct and an incorrect response to the same "
                                  "instruction; with 1 response per instruction there are no pairs")
            specs.append(spec)
    return specs


@dataclass
class ScaleInstructionsConfig(StudyConfig):
    """Figure 4: PRMs trained on a seeded fraction of the instructions (all their responses)."""

    name: str = "scale_instructions"
    fractions: list[float] = param(factory=lambda: [0.25, 0.5, 0.75, 1.0],
                                   help="seeded fractions of the training instructions")
    objectives: list[str] = param(factory=lambda: ["ce"], help="implicit objectives, one series each")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_implicit(self.objectives)
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
    objectives: list[str] = param(factory=lambda: ["ce", "ce-dataset", "ce-instruction", "dpo", "kto", "nca"],
                                  help="implicit objectives; ce-dataset / ce-instruction: CE with that balancing")
    reference_ablation: bool = param(True, "Table 4: CE with the reference on/off at training x inference")
    train_variants: dict[str, dict[str, Any]] = param(
        factory=dict, help="more rows: name -> changes to top-level train fields (e.g. {beta: 0.5, epochs: 3}); "
                           "every objective is trained once more with each, as row `<objective>-<name>` (a sweep "
                           "of training settings with paired intervals; run it on the validation split)")

    def __post_init__(self) -> None:
        super().__post_init__()
        valid = set(IMPLICIT_OBJECTIVES) | {f"ce-{b}" for b in BALANCE_MODES if b != "none"}
        bad = [o for o in self.objectives if o not in valid]
        if bad:
            raise ConfigError(f"objectives {bad} unknown; valid: {sorted(valid)}")
        fixed = ("dataset", "ref_pass", "workers", "data", "model", "reference_model", "out", "seed", "use_reference",
                 "overwrite", "ray_address", "debug_kill_rank", "debug_kill_at_step")
        for name, changes in self.train_variants.items():
            if not re.fullmatch(r"[A-Za-z0-9_.=+-]+", str(name)):
                raise ConfigError(f"train_variants: name {name!r} must be letters, digits or _.=+- (it names directories)")
            if not isinstance(changes, dict) or not changes:
                raise ConfigError(f"train_variants.{name}: expected a non-empty mapping of train fields, got {changes!r}")
            bad = [k for k in changes if k in fixed or k not in {f.name for f in fields(TrainConfig)}]
            if bad:
                raise ConfigError(f"train_variants.{name}: {bad} are not train fields a row may change "
                                  f"(top-level TrainConfig fields other than {', '.join(fixed)})")


def _objective_spec(objective: str, row: str, **changes: Any) -> PRMSpec:
    """A compare_objectives row: ``objective`` is e.g. ``ce`` or ``ce-dataset`` (CE, that balancing)."""
    obj, _, balance = objective.partition("-")
    return PRMSpec(row, objective=obj, balance=balance or "none", train_overrides=changes, axis={"objective": row})


def compare_objectives_specs(cfg: CompareObjectivesConfig) -> list[PRMSpec]:
    specs = [_objective_spec(name, name) for name in cfg.objectives]
    if cfg.reference_ablation:
        for train_ref in (True, False):
            for infer_ref in (True, False):
                if train_ref == cfg.train.use_reference and infer_ref == cfg.eval.use_reference and "ce" in cfg.objectives:
                    continue  # the plain CE row above
                label = f"ce ref train={'on' if train_ref else 'off'} infer={'on' if infer_ref else 'off'}"
                specs.append(PRMSpec(label.replace(" ", "_").replace("=", "-"), objective="ce",
                                     reference_train=train_ref, reference_infer=infer_ref,
                                     axis={"reference (train/inference)": f"{int(train_ref)}/{int(infer_ref)}",
                                           "series": "ce"}))
    specs += [_objective_spec(name, f"{name}-{variant}", **changes)
              for variant, changes in cfg.train_variants.items() for name in cfg.objectives]
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
    objectives: list[str] = param(factory=lambda: ["ce", "dpo"], help="the implicit PRMs' objectives")
    responses: list[int] = param(factory=lambda: [2, 8], help="the implicit PRMs' responses per instruction")
    shepherd_labels: list[str] = param(factory=lambda: ["hard", "soft"],
                                       help="Math-Shepherd PRMs: hard and/or soft (labels from completions) and/or "
                                            "exact (the step checker's labels of the same responses: the best any "
                                            "completion estimate can do; arith only)")
    # Chosen on the validation split among lr {1e-4, 1e-3} x epochs {1, 3} for Math-Shepherd-hard:
    # best-of-16 39.6 / 42.6 / 45.9 / 48.5 (docs/baselines.md).
    shepherd_lr: float | None = param(1e-3, "the explicit PRMs' learning rate; null: train.lr (chosen for the "
                                            "implicit PRM)")
    shepherd_epochs: int | None = param(3, "the explicit PRMs' epochs; null: train.epochs")
    shepherd: ShepherdConfig = param(factory=_shepherd, help="the step labels (the study sets rollouts, model "
                                                             "and out; engine and verifier left at their defaults "
                                                             "mean the training rollouts' pools)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_implicit(self.objectives)
        bad = [x for x in self.shepherd_labels if x not in ("hard", "soft", "exact")]
        if bad:
            raise ConfigError(f"shepherd_labels must be among 'hard', 'soft', 'exact', got {bad}")
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
        if kind == "exact":  # exact labels are 0/1: the hard-label objective
            specs.append(PRMSpec("math-shepherd-exact", objective="math-shepherd-hard", label_method="exact",
                                 train_overrides=overrides, axis={"method": "exact step labels", "series": "Math-Shepherd"}))
            continue
        specs.append(PRMSpec(f"math-shepherd-{kind}", objective=f"math-shepherd-{kind}", train_overrides=overrides,
                             axis={"method": f"Math-Shepherd ({kind})", "series": "Math-Shepherd"}))
    return specs
