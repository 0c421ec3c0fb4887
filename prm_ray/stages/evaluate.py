"""Evaluate a PRM on held-out rollouts: score every response step by step with Ray Data, then
best-of-N, weighted majority voting, majority voting and pass@k (:mod:`prm_ray.core.metrics`).

Two passes of the same actor (:class:`prm_ray.stages.logprobs.ModelPass`) over the rollout Parquet:

1. :func:`reference_logprobs`: the reference model's log-prob of every response token, computed
   ONCE per held-out set and stored next to it; every PRM evaluated on that set reuses it (the
   paper's eval code caches reference log-probs the same way).
2. :func:`score`: the PRM's token rewards (``beta * (logp - ref_logp)``, eq. 3, or an explicit
   PRM's step probabilities), step rewards, q-values and every aggregation, written as Parquet.

The per-response numbers equal ``ImplicitPRM.score`` on the same (prompt, response) (tested).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import torch

from prm_ray.artifacts import (
    EVAL_CONFIG,
    METRICS_FILE,
    REF_DONE,
    check_columns,
    check_settings,
    data_dir,
    parquet_source,
    read_json,
    read_prm_card,
    write_json,
)
from prm_ray.config import ConfigError, param, save_config, to_dict
from prm_ray.core.metrics import PROTOCOLS, TIES, VOTE_ON, problem_values, score_coefficient
from prm_ray.core.reward import AGGREGATIONS, STEP_SPLITS, aggregate
from prm_ray.stages.logprobs import LogprobPassConfig, ModelPass, check_backend
from prm_ray.stages.runtime import init_ray, map_actors
from prm_ray.stages.tokenize import tokenize_dataset
from prm_ray.tokens import TOKEN_NAMES

__all__ = ["PRESETS", "ROLLOUT_COLUMNS", "EvaluateConfig", "EvaluationJobConfig", "evaluate_prm", "metrics",
           "per_problem", "problems_from_scores", "reaggregate", "reference_logprobs", "run_evaluation", "score",
           "score_scale"]

PRESETS: dict[str, dict] = {
    # The paper's released evaluation (PRIME-RL/ImplicitPRM eval/bon_eval.py, prm_eval_utils.py):
    # "Step N:" steps, the minimum step reward, sigmoid(0.001 x log-ratio) votes, first-wins ties,
    # the first N of the M samples. docs/evaluation.md, "The released protocol".
    "release": {"step_split": "release", "aggregation": "min", "vote_coef": 0.001, "vote_on": "log_ratio",
                "ties": "first", "protocol": "first"},
}

ROLLOUT_COLUMNS = ["instruction_id", "sample_index", "prompt", "response", "correct", "extracted_answer"]


def _columns(path: str | Path) -> list[str]:
    """:data:`ROLLOUT_COLUMNS`, plus ``answer_group`` where the data has it (rollouts made before
    answer groups existed do not: their votes fall back to the raw answer strings)."""
    names = pads.dataset(str(parquet_source(path)), format="parquet").schema.names
    return ROLLOUT_COLUMNS + (["answer_group"] if "answer_group" in names else [])


@dataclass
class EvaluateConfig(LogprobPassConfig):
    """How held-out rollouts are scored and which metrics are computed."""

    section: ClassVar[str] = "eval."

    preset: str | None = param(None, "release: the released eval's step_split, aggregation, vote_coef, vote_on, ties "
                                     "and protocol (fields left at their defaults take the preset's; a "
                                     "conflicting one is refused) | null: the fields as given")
    aggregation: str = param("min", "the best-of-N score of a response: min (the paper), sum, last_q, mean, last or prod "
                                    "of its step rewards, or min_q / sum_q of its q-values (the released eval's "
                                    "accumulative modes)")
    ns: list[int] | None = param(None, "the N of best-of-N and voting; null: 1, 2, 4, ... up to M (samples "
                                       "per problem)")
    protocol: str = param("first", "first: the first N of M samples (the paper) | random: the mean over "
                                   "random N-subsets")
    step_split: str = param("blank_line", "steps of a scored response: blank_line = the raw response split on "
                                          "blank lines | release = the released eval's: split on 'Step N:' markers, "
                                          "rewritten 'Step k: ...' and joined by blank lines (docs/evaluation.md)")
    random_subsets: int = param(100, "subsets per N under protocol random")
    seed: int = param(0, "seed of the random subsets")
    vote_coef: float = param(0.001, "weighted voting weighs a response by sigmoid(vote_coef x v), v per vote_on; "
                                    "the released eval: 0.001 on the log-ratio")
    vote_on: str = param("log_ratio", "what vote_coef multiplies: log_ratio = the aggregated log-ratio without "
                                      "beta (score / beta; the released eval, where 0.001 stands in for beta) | "
                                      "score = the beta-scaled score")
    ties: str = param("expected", "ties in best-of-N and voting: expected = the expected accuracy of a random "
                                  "pick among the tied (order-free) | first = the first tied sample or answer "
                                  "(the released eval)")
    use_reference: bool = param(True, "score with the reference model's log-probs; false: beta x log pi_phi "
                                      "only (paper Table 4, \"w/o ref\")")

    def __post_init__(self) -> None:
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ConfigError(f"eval.preset must be one of {sorted(PRESETS)} or null, got {self.preset!r}")
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name, value in PRESETS[self.preset].items():
                mine = getattr(self, name)
                if mine != value and mine != defaults[name]:
                    raise ConfigError(f"eval.{name} is {mine!r} but eval.preset {self.preset} sets {value!r}; "
                                      f"drop one of them")
                setattr(self, name, value)
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"eval.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"eval.protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.step_split not in STEP_SPLITS:
            raise ConfigError(f"eval.step_split must be one of {STEP_SPLITS}, got {self.step_split!r}")
        if self.vote_on not in VOTE_ON:
            raise ConfigError(f"eval.vote_on must be one of {VOTE_ON}, got {self.vote_on!r}")
        if self.ties not in TIES:
            raise ConfigError(f"eval.ties must be one of {TIES}, got {self.ties!r}")
        if not (math.isfinite(self.vote_coef) and self.vote_coef > 0):
            raise ConfigError(f"eval.vote_coef must be a finite number > 0, got {self.vote_coef}")
        if self.ns is not None and (not self.ns or min(self.ns) < 1):
            raise ConfigError(f"eval.ns must be positive integers, got {self.ns}")
        if self.random_subsets < 1:
            raise ConfigError(f"eval.random_subsets must be >= 1, got {self.random_subsets}")
        super().__post_init__()

    def pass_config(self) -> LogprobPassConfig:
        """The model-pass part of this config (what the reference pass of the same set runs with)."""
        return LogprobPassConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LogprobPassConfig)})


def _source(path: str | Path, columns: list[str]) -> Path:
    """The Parquet files of a dataset directory, checked for ``columns`` (footers only)."""
    src = parquet_source(path)
    if not src.exists():
        raise FileNotFoundError(f"no scored-data directory at {src}")
    check_columns(pads.dataset(str(src), format="parquet").schema.names, columns, str(src))
    return src


def _read_tokenized(path: str | Path, columns: list[str], tokenizer: str, blocks: int,
                    step_split: str = "blank_line") -> ray.data.Dataset:
    """``columns`` of a dataset and its token columns for ``tokenizer`` (made once, then reused)."""
    _source(path, columns)  # a missing column is named before anything is tokenized
    tokens, _ = tokenize_dataset(path, tokenizer, step_split=step_split)
    src = _source(tokens, columns + list(TOKEN_NAMES))
    # Several blocks per replica: a single file is read as one block, which would feed a single
    # actor and idle the others (a held-out set is small enough for this to be cheap).
    return ray.data.read_parquet(str(src), columns=columns + list(TOKEN_NAMES),
                                 file_extensions=["parquet"]).repartition(blocks)


def _model_pass(ds: ray.data.Dataset, model: str, output: str, cfg: LogprobPassConfig, stage: str,
                **kwargs) -> ray.data.Dataset:
    return map_actors(ds, ModelPass, cfg, stage=stage, batch_size=cfg.batch_size,
                      constructor_kwargs=cfg.actor_kwargs(model, output, **kwargs), **cfg.actor_options())


def reference_logprobs(rollouts: str | Path, ref_model: str, out: str | Path, cfg: LogprobPassConfig, *,
                       step_split: str = "blank_line", overwrite: bool = False) -> dict:
    """Write the rollouts plus per-token reference log-probs (``ref_token_logp``) to ``out``.

    A finished pass over the same rollouts, model and dtype is reused; one made with other
    settings is refused (``overwrite`` replaces it). ``step_split`` must be the scoring's
    (:attr:`EvaluateConfig.step_split`): the ``release`` split scores rewritten texts.
    """
    out = Path(out)
    cfg = cfg.resolved()
    key = {"rollouts": str(Path(rollouts).resolve()), "ref_model": str(ref_model), "dtype": cfg.dtype}
    if cfg.backend != "hf":  # named only when not the default, so caches made before backends existed stay valid
        key["backend"] = cfg.backend
    if step_split != "blank_line":  # the release split scores rewritten texts: other tokens
        key["step_split"] = step_split
    info = read_json(out / REF_DONE)
    if info is not None and check_settings(out, info["key"], key, what="reference log-probs", overwrite=overwrite):
        return {**info, "reused": True}
    init_ray()
    t0 = time.time()
    ds = _model_pass(_read_tokenized(rollouts, _columns(rollouts), ref_model, 4 * cfg.replicas, step_split),
                     ref_model, "token_logp", cfg, "eval", step_split=step_split)
    ds.write_parquet(str(data_dir(out)))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in data_dir(out).glob("*.parquet"))
    info = {"key": key, "rows": rows, "seconds": time.time() - t0}
    write_json(out / REF_DONE, info)
    return {**info, "reused": False}


def score(data: str | Path, prm: str, out: str | Path, cfg: EvaluateConfig, beta: float) -> dict:
    """Score every response of ``data`` (rollouts, with ``ref_token_logp`` when
    ``cfg.use_reference``) with the PRM at ``prm``; Parquet rows of
    :data:`prm_ray.stages.logprobs.SCORE_SCHEMA` in ``out``. Returns ``{"seconds", "rows"}``."""
    t0 = time.time()
    cols = _columns(data) + (["ref_token_logp"] if cfg.use_reference else [])
    ds = _model_pass(_read_tokenized(data, cols, prm, 4 * cfg.replicas, cfg.step_split), prm, "scores", cfg, "eval",
                     beta=beta, use_reference=cfg.use_reference, step_split=cfg.step_split)
    ds.write_parquet(str(out))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in Path(out).glob("*.parquet"))
    return {"seconds": time.time() - t0, "rows": rows}


def problems_from_scores(scores: str | Path | pa.Table, aggregation: str = "min",
                         votes: str = "answer_group") -> list[dict]:
    """Group scored responses by instruction (sorted by sample_index) for ``prm_ray.core.metrics``;
    a response's answer is its ``votes`` column: ``answer_group``, so that equivalent answers vote
    together, or ``extracted_answer`` (raw strings) for rollouts made without groups."""
    table = scores if isinstance(scores, pa.Table) else pads.dataset(str(scores), format="parquet").to_table(
        columns=["instruction_id", "sample_index", "correct", votes, f"score_{aggregation}"])
    cols = table.to_pydict()
    by: dict[str, list] = defaultdict(list)
    for iid, j, c, a, s in zip(cols["instruction_id"], cols["sample_index"], cols["correct"],
                               cols[votes], cols[f"score_{aggregation}"]):
        by[iid].append((j, bool(c), a, float(s)))
    problems = []
    for iid in sorted(by):
        samples = sorted(by[iid])
        idx = [s[0] for s in samples]
        if len(set(idx)) != len(idx):
            raise ValueError(f"instruction {iid!r} has duplicate sample_index values")
        problems.append({"instruction_id": iid, "correct": [s[1] for s in samples],
                         "answers": [s[2] for s in samples], "scores": [s[3] for s in samples]})
    return problems


def per_problem(problems: list[dict], cfg: EvaluateConfig, beta: float = 1.0) -> dict[str, np.ndarray]:
    """Every metric of every scored problem (metric -> one value per problem, in ``problems``'
    order). ``beta``: what the scores are scaled by (:func:`score_scale`), so ``vote_on:
    log_ratio`` can undo it."""
    return problem_values(problems, cfg.ns, protocol=cfg.protocol, subsets=cfg.random_subsets, seed=cfg.seed,
                          vote_coef=score_coefficient(cfg.vote_coef, cfg.vote_on, beta), ties=cfg.ties)


def reaggregate(scores: str | Path | pa.Table, methods: list[str]) -> pa.Table:
    """A scoring pass's rows with ``score_<method>`` recomputed from their stored ``step_rewards``
    by :func:`prm_ray.core.reward.aggregate` (another aggregation without another model pass;
    also for score files written before that aggregation existed)."""
    table = scores if isinstance(scores, pa.Table) else pads.dataset(str(scores), format="parquet").to_table()
    rewards = table.column("step_rewards").to_pylist()
    width = max((len(r) for r in rewards), default=0)
    padded = torch.zeros(len(rewards), width, dtype=torch.float64)
    mask = torch.zeros(len(rewards), width, dtype=torch.bool)
    for i, r in enumerate(rewards):
        padded[i, : len(r)] = torch.tensor(r, dtype=torch.float64)
        mask[i, : len(r)] = True
    for method in methods:
        column = pa.array(aggregate(padded, mask, method).tolist(), pa.float64())
        name = f"score_{method}"
        table = table.set_column(table.column_names.index(name), name, column) if name in table.column_names \
            else table.append_column(name, column)
    return table


def metrics(problems: list[dict], cfg: EvaluateConfig, beta: float = 1.0) -> dict[str, float]:
    """Every metric of scored problems, averaged over them (:func:`per_problem`)."""
    return {k: float(v.mean()) for k, v in per_problem(problems, cfg, beta).items()}


def score_scale(card: dict, beta: float | None = None) -> float:
    """What a PRM's scores are scaled by: an implicit PRM's beta (``beta``, else its card's, else
    0.05); 1 for an explicit PRM, whose score is a probability, not a beta-scaled log-ratio."""
    if card.get("kind") == "explicit":
        return 1.0
    return float(beta if beta is not None else card.get("beta", 0.05))


def _check_prm(card: dict, prm: str, cfg: EvaluateConfig) -> None:
    """Refuse what this PRM cannot be scored with, naming the field, before any pass runs."""
    check_backend(card, prm, cfg.backend, "eval.")
    if card.get("kind") == "explicit" and cfg.use_reference:
        raise ConfigError(f"eval.use_reference is true but {prm} is an explicit PRM ({card.get('objective')}), "
                          "which has no reference model; set eval.use_reference false")


def evaluate_prm(prm: str, data: str | Path, out: str | Path, cfg: EvaluateConfig, *,
                 beta: float | None = None, overwrite: bool = False) -> dict:
    """Score ``data`` with the PRM at ``prm`` and compute every metric; writes ``<out>/metrics.json``
    and ``<out>/scores/``. The same inputs and config reuse ``out``; other ones are refused
    (``overwrite`` replaces them).

    ``data``: rollouts with ``ref_token_logp`` (see :func:`reference_logprobs`) when
    ``cfg.use_reference``, plain rollouts otherwise. ``beta`` defaults to the PRM card's.
    """
    out = Path(out)
    cfg = cfg.resolved()
    card = read_prm_card(prm)
    beta = float(beta if beta is not None else card.get("beta", 0.05))
    _check_prm(card, prm, cfg)
    key = {"prm": str(Path(prm).resolve()), "data": str(Path(data).resolve()), "beta": beta, "config": to_dict(cfg)}
    prev = read_json(out / METRICS_FILE)
    if prev is not None and check_settings(out, prev["key"], key, what="an evaluation", overwrite=overwrite):
        return {**prev, "reused": True}
    out.mkdir(parents=True, exist_ok=True)
    init_ray()
    votes = "answer_group" if "answer_group" in _columns(data) else "extracted_answer"
    if votes != "answer_group":
        warnings.warn(f"{data} has no answer_group column (rollouts made before answer groups): votes count "
                      "raw answer strings, so equivalent spellings vote apart; re-run the rollouts to group them",
                      stacklevel=2)
    scored = score(data, prm, out / "scores", cfg, beta)
    problems = problems_from_scores(out / "scores", cfg.aggregation, votes)
    result = {"key": key, "metrics": metrics(problems, cfg, score_scale(card, beta)), "problems": len(problems),
              "samples_per_problem": len(problems[0]["correct"]), "score_seconds": scored["seconds"], "dtype": cfg.dtype,
              "votes_by": votes,
              "responses": sum(len(p["correct"]) for p in problems)}
    save_config(cfg, out / EVAL_CONFIG)
    write_json(out / METRICS_FILE, result)
    return {**result, "reused": False}


@dataclass(kw_only=True)
class EvaluationJobConfig:
    """Evaluate one PRM on held-out rollouts (``jobs/evaluate_prm.py``): the reference pass, then
    the PRM pass and every metric. Any implicit PRM works, prm-ray's own or a released checkpoint."""

    prm: str = param(dataclasses.MISSING, "the PRM: a jobs/train_prm.py output, or any causal-LM directory or "
                                          "hub id (then say reference_model, and beta if not 0.05)")
    data: str = param(dataclasses.MISSING, "held-out rollouts (a jobs/rollout.py --out), M samples per problem")
    out: str = param("runs/eval", "output directory: ref-logprobs/ (reused across PRMs of the same data) and "
                                  "eval/ (scores, metrics.json, eval_config.yaml)")
    reference_model: str | None = param(None, "the implicit reward's reference; null: the PRM card's "
                                              "reference_model (prm-ray PRMs)")
    beta: float | None = param(None, "the PRM's beta; null: the card's, else 0.05 (best-of-N does not depend on it; "
                                     "eval.vote_on log_ratio divides scores by it)")
    eval: EvaluateConfig = param(factory=EvaluateConfig, help="")
    overwrite: bool = param(False, "replace outputs made with other settings (else refused)")
    ray_address: str | None = param(None, "null: RAY_ADDRESS, a running local cluster, or a new one")

    def __post_init__(self) -> None:
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"beta must be a finite number > 0, got {self.beta}")


def run_evaluation(cfg: EvaluationJobConfig) -> dict:
    """The reference pass (when ``eval.use_reference``) and :func:`evaluate_prm`; returns the
    evaluation's result with ``reference`` (the pass's info) added."""
    card = read_prm_card(cfg.prm)
    reference = cfg.reference_model or card.get("reference_model")
    init_ray(cfg.ray_address)
    out = Path(cfg.out)
    data, ref_info = Path(cfg.data), None
    _check_prm(card, cfg.prm, cfg.eval)
    if cfg.eval.use_reference:
        if reference is None:
            raise ConfigError(f"reference_model: {cfg.prm} has no prm-ray card naming its reference; give "
                              "--reference_model (or --eval.use_reference false for \"w/o ref\" scores)")
        ref_info = reference_logprobs(data, reference, out / "ref-logprobs", cfg.eval.pass_config(),
                                      step_split=cfg.eval.step_split, overwrite=cfg.overwrite)
        data = out / "ref-logprobs"
    save_config(cfg, out / "config.yaml")
    result = evaluate_prm(cfg.prm, data, out / "eval", cfg.eval, beta=cfg.beta, overwrite=cfg.overwrite)
    return {**result, "reference": ref_info}
