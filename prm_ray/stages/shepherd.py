"""Math-Shepherd step labels (Wang et al., 2024): Monte-Carlo completions from every step boundary.

For a verified response split into steps s_1..s_S (exactly the split the PRM trainer and scorer
use: :func:`prm_ray.tokens.encode_pair`, separator "\\n\\n"), each boundary t < S is labelled by
sampling K completions from the policy continuing the prefix s_1..s_t and verifying
``prefix + completion`` against the gold answer:

    hard label = 1 if any completion reaches the gold answer else 0
    soft label = (completions that reach it) / K

The last step's label is the response's own correctness (its only completion is itself).

Pipeline (:mod:`prm_ray.stages.shards`, one shard of ``shard_size`` responses per batch, like the rollouts)::

    shard rows --> ShepherdSampler (vllm.LLM; K requests per boundary, each with its own seed)
               --> ShepherdVerifier (the rollouts' task verifier, on prefix + completion)
               --> write_labels (labels; one Parquet file per shard, atomic) --> driver: stats only

A killed run resumes by skipping shard files that exist; a finished output directory with the same
settings is returned as is (``"reused": true``) without starting any Ray work.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from prm_ray.artifacts import (
    ROLLOUT_META,
    SHEPHERD_META,
    SUMMARY_FILE,
    append_run,
    check_settings,
    data_dir,
    fingerprint,
    load_rollouts,
    read_json,
    shard_path,
    write_json,
    write_parquet_atomic,
)
from prm_ray.cli import root_cause
from prm_ray.config import ConfigError, from_dict, param, save_config, to_dict
from prm_ray.core.flops import forward_flops
from prm_ray.stages.rollout import (
    SCHEMA,
    EngineConfig,
    RolloutConfig,
    Verifier,
    VerifierConfig,
    VLLMSampler,
    engine_environment,
    make_task,
    sample_seed,
)
from prm_ray.stages.runtime import cpu_seconds, init_ray
from prm_ray.stages.shards import one_shard, stream_shards
from prm_ray.tasks import LABELLED, UNVERIFIABLE

__all__ = ["LABEL_SCHEMA", "ShepherdConfig", "ShepherdSampler", "ShepherdSamplingConfig",
           "ShepherdVerifier", "run_shepherd", "summarize_labels", "write_labels"]

LABEL_SCHEMA = pa.schema(list(SCHEMA) + [
    ("steps", pa.list_(pa.string())),  # the PRM's step split; concatenates back to `response`
    ("step_completions", pa.list_(pa.int32())),  # K per boundary; 1 for the last step
    ("step_correct", pa.list_(pa.int32())),  # completions reaching the gold answer (last: correct)
    ("step_labels_hard", pa.list_(pa.float32())),  # 1 if step_correct > 0 else 0
    ("step_labels_soft", pa.list_(pa.float32())),  # step_correct / step_completions
    ("completion_prompt_tokens", pa.int64()),  # sum of the completion requests' prompt lengths
    ("completion_generated_tokens", pa.int64()),  # sum of the completions' generated tokens
    ("completions_unverifiable", pa.int32()),  # completions with verify_status timeout/error
])
"""One row per labelled response: the rollout columns plus the step labels (docs/rollouts.md)."""

LABEL_METHODS = ("monte_carlo", "exact")
SKIP_REASONS = ("unverifiable_timeout", "unverifiable_error", "beyond_first_k", "exceeds_context")


@dataclass
class ShepherdSamplingConfig:
    """How completions are sampled; null fields take the rollouts' own values (rollout_meta.json),
    so completions come from the distribution the responses were sampled from."""

    temperature: float | None = param(None, "null: the rollouts' temperature")
    top_p: float = param(1.0, "nucleus sampling")
    max_tokens: int | None = param(None, "null: the rollouts' max_tokens; a completion gets what the response "
                                         "had left after the prefix (at least 1), capped by the context")
    seed: int = param(0, "each completion's seed is sha256(seed, instruction/sample/step, index)")


@dataclass
class ShepherdConfig:
    """Label every step of verified rollouts by Monte-Carlo completion (Math-Shepherd)."""

    rollouts: str = param("runs/rollouts/train", "a rollout output directory (holds rollout_meta.json and data/)")
    out: str = param("runs/shepherd", "output directory (the step-labelled set)")
    method: str = param("monte_carlo", "monte_carlo: Math-Shepherd's completions from each step boundary | exact: "
                                       "the task's step checker (arith), a step is good until the first wrong "
                                       "one, no sampling (the upper bound of what completions estimate)")
    model: str | None = param(None, "the completer; null: the rollouts' own model")
    completions_per_step: int = param(8, "K completions per step boundary (the paper's default)")
    responses_per_instruction: int | None = param(None, "label the first k verifiable responses by sample_index; "
                                                        "null: all")
    shard_size: int = param(64, "responses per output file (the unit of resume)")
    sampling: ShepherdSamplingConfig = param(factory=ShepherdSamplingConfig, help="")
    engine: EngineConfig = param(factory=EngineConfig, help="")
    verifier: VerifierConfig = param(factory=VerifierConfig, help="")
    overwrite: bool = param(False, "replace an output directory made with other settings (else refused)")
    ray_address: str | None = param(None, "null: RAY_ADDRESS, a running local cluster, or a new one")
    progress: bool = param(True, "show a progress bar")

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1{' or null' if allow_none else ''}, "
                                  f"got {value!r}")

        for name in ("rollouts", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name} must be a non-empty path, got {getattr(self, name)!r}")
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ConfigError(f"model must be a non-empty path/hub id or null, got {self.model!r}")
        if self.method not in LABEL_METHODS:
            raise ConfigError(f"method must be one of {LABEL_METHODS}, got {self.method!r}")
        positive_int("completions_per_step", self.completions_per_step)
        positive_int("responses_per_instruction", self.responses_per_instruction, allow_none=True)
        positive_int("shard_size", self.shard_size)
        s = self.sampling
        if s.temperature is not None and (isinstance(s.temperature, bool) or s.temperature < 0):
            raise ConfigError(f"sampling.temperature must be >= 0 or null, got {s.temperature!r}")
        if isinstance(s.top_p, bool) or not 0 < s.top_p <= 1:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {s.top_p!r}")
        positive_int("sampling.max_tokens", s.max_tokens, allow_none=True)
        if isinstance(s.seed, bool) or not isinstance(s.seed, int):
            raise ConfigError(f"sampling.seed must be an integer, got {s.seed!r}")


# --------------------------------------------------------------------------------------------
# Ray Data stages. Each receives and returns a one-row pyarrow table holding one shard: lists of
# the responses' rollout columns plus `steps`; the sampler adds one entry per completion
# (c_row = the response's position in the shard, c_step = boundary t, c_index = j).
# --------------------------------------------------------------------------------------------


class ShepherdSampler(VLLMSampler):
    """The policy's vLLM engine in a Ray actor; K completions per step boundary of a shard.

    Constructor and call contract (also of ``sampler_cls`` replacements): ``(model, engine,
    sampling, completions_per_step)`` where ``sampling`` holds the resolved ``temperature``,
    ``top_p``, ``max_tokens``, ``seed`` and ``context_length``; ``__call__(shard) -> shard`` adding
    ``c_row, c_step, c_index, c_seed, c_text, c_tokens, c_prompt_tokens`` and
    ``generate_seconds, engine_startup_seconds, engine_dtype``. A test double can override only
    :meth:`_generate` (and skip the engine in ``__init__``) to reuse the request building here.
    """

    def __init__(self, model: str, engine: dict, sampling: dict, completions_per_step: int) -> None:
        super().__init__(model, engine, sampling, sampling["temperature"])
        self.k = completions_per_step

    def _requests(self, shard: dict) -> list[dict]:
        """One request per (response, boundary t, completion j): chat-rendered prompt ids + the
        prefix's ids (tokenized separately and concatenated, as encode_pair does)."""
        # torch-based modules in the engine actor and the driver only: the verifier actors and
        # writer tasks of this stage import this module and need no torch.
        from prm_ray.tokens import prompt_ids

        s, tok = self.sampling, self.tokenizer
        ctx = s.get("context_length")
        rendered: dict[str, list[int]] = {}
        requests = []
        for r, (iid, sidx, prompt, steps) in enumerate(zip(shard["instruction_id"], shard["sample_index"],
                                                           shard["prompt"], shard["steps"])):
            if prompt not in rendered:
                rendered[prompt] = prompt_ids(tok, prompt)
            p_ids = rendered[prompt]
            for t in range(len(steps) - 1):
                prefix = "".join(steps[: t + 1])
                x_ids = tok(prefix, add_special_tokens=False)["input_ids"]
                ids = list(p_ids) + list(x_ids)
                # The response's own budget minus what the prefix used, and room for the EOS that
                # training/scoring append (as VLLMSampler caps responses).
                budget = s["max_tokens"] - len(x_ids)
                if ctx:
                    budget = min(budget, ctx - len(ids) - 1)
                budget = max(1, budget)
                for j in range(self.k):
                    requests.append({"row": r, "step": t, "index": j, "prefix": prefix,
                                     "prompt_token_ids": ids, "max_tokens": budget,
                                     "seed": sample_seed(s["seed"], f"{iid}/{sidx}/{t}", j)})
        return requests

    def _generate(self, requests: list[dict]) -> list[tuple[str, int]]:
        """(completion text, generated tokens) per request, in order."""
        if not requests:
            return []
        from vllm import SamplingParams  # engine actors only (see VLLMSampler)

        s = self.sampling
        params = [SamplingParams(n=1, temperature=self.temperature, top_p=s["top_p"],
                                 max_tokens=q["max_tokens"], seed=q["seed"]) for q in requests]
        outputs = self.llm.generate([{"prompt_token_ids": q["prompt_token_ids"]} for q in requests],
                                    params, use_tqdm=False)
        return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outputs]

    def __call__(self, batch: pa.Table) -> pa.Table:
        shard = one_shard(batch)
        requests = self._requests(shard)
        t0 = time.time()
        results = self._generate(requests)
        gen_s = time.time() - t0
        if len(results) != len(requests):
            raise RuntimeError(f"{len(results)} completions for {len(requests)} requests")
        shard.update(
            c_row=[q["row"] for q in requests], c_step=[q["step"] for q in requests],
            c_index=[q["index"] for q in requests], c_seed=[q["seed"] for q in requests],
            c_prompt_tokens=[len(q["prompt_token_ids"]) for q in requests],
            c_text=[text for text, _ in results], c_tokens=[n for _, n in results],
            generate_seconds=gen_s, engine_startup_seconds=self.startup_s,
            engine_dtype=getattr(self, "dtype", "unknown"),
        )
        self.startup_s = 0.0  # count start-up once per actor
        return pa.Table.from_pylist([shard])


class ShepherdVerifier(Verifier):
    """The rollouts' task verifier in a Ray actor, judging ``prefix + completion``."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        shard = one_shard(batch)
        steps, gold = shard["steps"], shard["gold_answer"]
        texts = ["".join(steps[r][: t + 1]) + c
                 for r, t, c in zip(shard["c_row"], shard["c_step"], shard["c_text"])]
        t0 = time.time()
        verdicts = self.task.verify_batch(texts, [gold[r] for r in shard["c_row"]]) if texts else []
        shard["verify_seconds"] = time.time() - t0
        shard["c_correct"] = [bool(v.correct) for v in verdicts]
        shard["c_status"] = [v.status.value for v in verdicts]
        return pa.Table.from_pylist([shard])


def _labels(shard: dict) -> dict[str, list]:
    """Per response: completions, correct counts, hard/soft labels, token and unverifiable counts."""
    n = len(shard["response"])
    correct = [[0] * (len(s) - 1) for s in shard["steps"]]
    sampled = [[0] * (len(s) - 1) for s in shard["steps"]]
    unverifiable, prompt_tok, gen_tok = [0] * n, [0] * n, [0] * n
    for r, t, ok, status, pt, gt in zip(shard["c_row"], shard["c_step"], shard["c_correct"], shard["c_status"],
                                        shard["c_prompt_tokens"], shard["c_tokens"]):
        sampled[r][t] += 1
        correct[r][t] += bool(ok)
        unverifiable[r] += status in UNVERIFIABLE
        prompt_tok[r] += pt
        gen_tok[r] += gt
    out: dict[str, list] = {k: [] for k in ("step_completions", "step_correct", "step_labels_hard",
                                            "step_labels_soft")}
    for r in range(n):
        comp = sampled[r] + [1]  # the last step's only completion is the response itself
        corr = correct[r] + [int(bool(shard["correct"][r]))]
        out["step_completions"].append(comp)
        out["step_correct"].append(corr)
        out["step_labels_hard"].append([float(c > 0) for c in corr])
        out["step_labels_soft"].append([c / m for c, m in zip(corr, comp)])
    out.update(completion_prompt_tokens=prompt_tok, completion_generated_tokens=gen_tok,
               completions_unverifiable=unverifiable)
    return out


def exact_labels(shard: dict, task) -> dict[str, list]:
    """:func:`_labels`' columns from the task's step checker instead of completions: a step's label
    is 1 until the response's first wrong step, 0 from there (no completions, no tokens)."""
    out: dict[str, list] = {k: [] for k in ("step_completions", "step_correct", "step_labels_hard",
                                            "step_labels_soft")}
    for prompt, steps in zip(shard["prompt"], shard["steps"]):
        first = task.check_steps(prompt, steps).first_error
        good = [int(first < 0 or t < first) for t in range(len(steps))]
        out["step_completions"].append([0] * len(steps))
        out["step_correct"].append(good)
        out["step_labels_hard"].append([float(g) for g in good])
        out["step_labels_soft"].append([float(g) for g in good])
    n = len(shard["steps"])
    out.update(completion_prompt_tokens=[0] * n, completion_generated_tokens=[0] * n, completions_unverifiable=[0] * n)
    return out


def write_labels(batch: pa.Table, out: str) -> pa.Table:
    """Label one shard's responses and write them to Parquet atomically; return its stats."""
    shard = one_shard(batch)
    labels = _labels(shard)
    cols = {name: shard[name] for name in SCHEMA.names}
    cols["steps"] = shard["steps"]
    cols.update(labels)
    table = pa.table({name: cols[name] for name in LABEL_SCHEMA.names}, schema=LABEL_SCHEMA)
    write_parquet_atomic(table, shard_path(Path(out), shard["shard_id"]))
    return pa.Table.from_pylist([{
        "shard_id": shard["shard_id"], "responses": table.num_rows,
        "completions": len(shard["c_row"]), "generated_tokens": sum(shard["c_tokens"]),
        "generate_seconds": shard["generate_seconds"], "verify_seconds": shard["verify_seconds"],
        "engine_startup_seconds": shard["engine_startup_seconds"], "engine_dtype": shard["engine_dtype"],
    }])


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _read_rollout_meta(rollouts: Path) -> dict:
    meta = read_json(rollouts / ROLLOUT_META)
    if meta is None:
        raise ConfigError(f"rollouts: {rollouts} is not a rollout output directory (no {ROLLOUT_META}); "
                          "point it at the --out of jobs/rollout.py")
    return meta


def _settings(cfg: ShepherdConfig, rollouts: Path, rmeta: dict) -> dict:
    """Everything that decides the labels; a different value refuses to reuse an output dir."""
    from prm_ray.models import context_length  # the driver only (see ShepherdSampler._requests)

    rcfg = rmeta["config"]
    model = cfg.model or rcfg["model"]
    s = cfg.sampling
    if cfg.method == "exact":  # the checker on the PRM's steps: the tokenizer's split is all that matters
        return {"rollouts_data": fingerprint(rollouts), "method": "exact", "model": model,
                "responses_per_instruction": cfg.responses_per_instruction, "shard_size": cfg.shard_size,
                "sampling": {"context_length": context_length(model, cfg.engine.max_model_len)}}
    return {
        "rollouts_data": fingerprint(rollouts),
        "model": model,
        "completions_per_step": cfg.completions_per_step,
        "responses_per_instruction": cfg.responses_per_instruction,
        "shard_size": cfg.shard_size,
        "sampling": {
            "temperature": s.temperature if s.temperature is not None else float(rmeta.get("temperature", 1.0)),
            "top_p": s.top_p,
            "max_tokens": s.max_tokens if s.max_tokens is not None else int(rcfg["sampling"]["max_tokens"]),
            "seed": s.seed,
            "context_length": context_length(model, cfg.engine.max_model_len),
        },
    }


SETTING_NAMES = {"rollouts_data": "rollouts (the rollout data differs)",
                 "sampling.context_length": "sampling.context_length (engine.max_model_len / model context)"}


def _plan(cfg: ShepherdConfig, rollouts: Path, settings: dict) -> tuple[list[dict], dict]:
    """Select the responses to label and split them into steps; return (shards, plan report)."""
    from prm_ray.models import load_tokenizer  # the driver only (see ShepherdSampler._requests)
    from prm_ray.tokens import encode_pair

    table = load_rollouts(rollouts, columns=SCHEMA.names)
    cols = table.select(["instruction_id", "sample_index", "verify_status", "correct"]).to_pydict()
    keys = list(zip(cols["instruction_id"], cols["sample_index"]))
    if len(set(keys)) != len(keys):
        dup = next(k for k, c in Counter(keys).items() if c > 1)
        raise ValueError(f"rollouts {rollouts}: duplicate (instruction_id, sample_index) {dup}")
    skipped = Counter({r: 0 for r in SKIP_REASONS})
    verifiable: dict[str, list[int]] = {}
    for i, status in enumerate(cols["verify_status"]):
        if status in UNVERIFIABLE:
            skipped[f"unverifiable_{status}"] += 1
        elif status in LABELLED and cols["correct"][i] is not None:
            verifiable.setdefault(cols["instruction_id"][i], []).append(i)
        else:
            raise ValueError(f"rollouts {rollouts}: row {keys[i]} has verify_status {status!r} and "
                             f"correct {cols['correct'][i]!r} (see docs/rollouts.md)")
    k = cfg.responses_per_instruction
    chosen = []
    for iid in sorted(verifiable):
        rows = sorted(verifiable[iid], key=lambda i: cols["sample_index"][i])
        if k is not None:
            skipped["beyond_first_k"] += len(rows[k:])
            rows = rows[:k]
        chosen.extend(rows)

    tok = load_tokenizer(settings["model"])
    ctx = settings["sampling"]["context_length"]
    sub = table.take(chosen).to_pydict() if chosen else {n: [] for n in SCHEMA.names}
    keep, steps = [], []
    for i, (prompt, response) in enumerate(zip(sub["prompt"], sub["response"])):
        try:
            item = encode_pair(tok, prompt, response, max_length=ctx)
        except ValueError:
            skipped["exceeds_context"] += 1
            continue
        keep.append(i)
        steps.append(item.steps)
    shards = []
    for sid, start in enumerate(range(0, len(keep), cfg.shard_size)):
        idx = keep[start : start + cfg.shard_size]
        shard = {"shard_id": sid, **{n: [sub[n][i] for i in idx] for n in SCHEMA.names},
                 "steps": steps[start : start + cfg.shard_size]}
        shards.append(shard)
    plan = {"rows_in_rollouts": table.num_rows, "rows_to_label": len(keep), "rows_skipped": dict(skipped),
            "num_shards": len(shards), "steps": sum(len(s) for s in steps),
            "boundaries": sum(len(s) - 1 for s in steps)}
    return shards, plan


TIMING_TOTALS = ("wall_seconds", "cpu_seconds", "plan_seconds", "generate_seconds", "verify_seconds",
                 "engine_startup_seconds", "shards_done", "completions", "generated_tokens")


def _append_run(out: Path, record: dict) -> dict:
    """Append this invocation's timing to runs.jsonl; return totals over all invocations."""
    runs = append_run(out, record)
    total = {k: sum(r.get(k, 0) for r in runs) for k in TIMING_TOTALS}
    return {"this_run": record, "total": total, "runs": len(runs)}


def _finished(out: Path) -> dict | None:
    """The summary of a complete labelling in ``out`` (every shard file there), else None."""
    summary = read_json(out / SUMMARY_FILE)
    if summary is None:
        return None
    n = summary.get("shards", {}).get("total")
    if not summary.get("complete") or n is None:
        return None
    if any(not shard_path(out, sid).exists() for sid in range(n)):
        return None
    return summary


def _run_pipeline(cfg: ShepherdConfig, settings: dict, rmeta: dict, out: Path, todo: list[dict],
                  sampler_cls: type, stats: list[dict]) -> None:
    """Sampler -> verifier -> writer over the shards still to do; appends each shard's stats."""
    init_ray(cfg.ray_address)
    stream_shards(
        todo, stats, out=out, engine=cfg.engine, engine_env=engine_environment(vars(cfg.engine)),
        verifier=cfg.verifier, sampler_cls=sampler_cls,
        sampler_kwargs={"model": settings["model"], "engine": vars(cfg.engine), "sampling": settings["sampling"],
                        "completions_per_step": cfg.completions_per_step},
        verifier_cls=ShepherdVerifier,
        verifier_kwargs={"cfg": dict(rmeta["config"], verifier=to_dict(cfg.verifier))},  # the rollouts' task, our pool
        writer=write_labels, total=sum(len(s["response"]) for s in todo),
        desc=f"step labels ({len(todo)} shards)", progress=cfg.progress,
        rate=lambda st: {"completions_s": f"{sum(s['completions'] for s in st) / max(sum(s['generate_seconds'] for s in st), 1e-9):.1f}"})


def run_shepherd(cfg: ShepherdConfig, sampler_cls: type | None = None) -> dict:
    """Label (or resume labelling) the steps of verified rollouts; returns the summary (also saved
    as ``<out>/summary.json``).

    ``sampler_cls`` replaces the vLLM stage (same constructor and call contract as
    :class:`ShepherdSampler`); tests use it to push scripted completions through the real verify,
    label and write stages.
    """
    t_start, cpu_start = time.time(), cpu_seconds()
    sampler_cls = sampler_cls or ShepherdSampler
    rollouts, out = Path(cfg.rollouts), Path(cfg.out)
    rmeta = _read_rollout_meta(rollouts)
    settings = _settings(cfg, rollouts, rmeta)
    old = read_json(out / SHEPHERD_META)
    check_settings(out, old and old["settings"], settings, what="step labels", overwrite=cfg.overwrite,
                   names=SETTING_NAMES)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    done = _finished(out)
    if done is not None:
        done["timing"] = _append_run(out, {
            "started": started, "reused": True, "wall_seconds": time.time() - t_start,
            "cpu_seconds": cpu_seconds() - cpu_start, "plan_seconds": 0.0,
            "generate_seconds": 0.0, "verify_seconds": 0.0, "engine_startup_seconds": 0.0,
            "shards_done": 0, "shards_reused": done["shards"]["total"], "completions": 0, "generated_tokens": 0,
            "engine_dtypes": []})
        done["shards"].update(done_this_run=0, reused_this_run=done["shards"]["total"])
        done["reused"] = True
        write_json(out / SUMMARY_FILE, done)
        return done

    data_dir(out).mkdir(parents=True, exist_ok=True)
    shards, plan = _plan(cfg, rollouts, settings)
    plan_s = time.time() - t_start
    write_json(out / SHEPHERD_META, {
        "settings": settings, "config": to_dict(cfg), "rollouts": str(rollouts.resolve()),
        "rollout_config": rmeta["config"], "schema": LABEL_SCHEMA.names, "plan": plan})
    save_config(cfg, out / "config.yaml")
    if not shards:
        raise ValueError(f"no responses to label in {rollouts}: {plan['rows_in_rollouts']} rows, "
                         f"skipped {plan['rows_skipped']}")

    todo = [s for s in shards if not shard_path(out, s["shard_id"]).exists()]
    stats: list[dict] = []
    if cfg.method == "exact":  # no sampling: label in the driver, a shard file at a time
        task = make_task(from_dict(RolloutConfig, rmeta["config"]))
        if not task.ERROR_KINDS:
            raise ConfigError(f"method exact: task {task.name!r} has no step checker (arith has one)")
        for shard in todo:
            cols = {name: shard[name] for name in SCHEMA.names}
            cols.update(steps=shard["steps"], **exact_labels(shard, task))
            write_parquet_atomic(pa.table({n: cols[n] for n in LABEL_SCHEMA.names}, schema=LABEL_SCHEMA),
                                 shard_path(out, shard["shard_id"]))
            stats.append({"generate_seconds": 0.0, "verify_seconds": 0.0, "engine_startup_seconds": 0.0,
                          "completions": 0, "generated_tokens": 0, "engine_dtype": "none"})
        todo = []
    t0 = time.time()

    def record(**extra) -> dict:
        return _append_run(out, {
            "started": started, "reused": False, "wall_seconds": time.time() - t_start,
            "cpu_seconds": cpu_seconds() - cpu_start, "plan_seconds": plan_s,
            "generate_seconds": sum(s["generate_seconds"] for s in stats),
            "verify_seconds": sum(s["verify_seconds"] for s in stats),
            "engine_startup_seconds": sum(s["engine_startup_seconds"] for s in stats),
            "pipeline_seconds": time.time() - t0 if todo else 0.0,
            "shards_done": len(stats), "shards_reused": len(shards) - len(todo),
            "completions": sum(s["completions"] for s in stats),
            "generated_tokens": sum(s["generated_tokens"] for s in stats),
            "engine_dtypes": sorted({s["engine_dtype"] for s in stats}), **extra,
        })

    if todo:
        try:
            _run_pipeline(cfg, settings, rmeta, out, todo, sampler_cls, stats)
        except BaseException as exc:  # a failed run's seconds still count towards the totals
            record(failed=root_cause(exc)[:500])
            raise

    summary = summarize_labels(out)
    summary.update(
        rows_in_rollouts=plan["rows_in_rollouts"], rows_skipped=plan["rows_skipped"],
        model=settings["model"], method=cfg.method,
        completions_per_step=cfg.completions_per_step if cfg.method == "monte_carlo" else 0,
        temperature=settings["sampling"].get("temperature"), max_tokens=settings["sampling"].get("max_tokens"),
        context_length=settings["sampling"]["context_length"],
        shards={"total": len(shards), "done_this_run": len(stats), "reused_this_run": len(shards) - len(todo)},
    )
    summary["complete"] = summary["rows_labelled"] == plan["rows_to_label"]
    from prm_ray.models import count_parameters  # the driver only (see ShepherdSampler._requests)

    params = count_parameters(settings["model"])
    completion_tokens = summary["completion_prompt_tokens"] + summary["completion_generated_tokens"]
    summary["compute"] = {"params": params, "completion_tokens": completion_tokens,
                          "flops": forward_flops(params, completion_tokens)}  # prm_ray/core/flops.py
    summary["timing"] = record()
    summary["reused"] = False
    write_json(out / SUMMARY_FILE, summary)
    return summary


def summarize_labels(out: str | Path) -> dict:
    """Label statistics recounted from the Parquet shards (streamed column-wise)."""
    dataset = pads.dataset(str(data_dir(Path(out))), format="parquet")
    rows = steps = boundaries = completions = correct_responses = unverifiable = 0
    prompt_tok = gen_tok = 0
    hard = soft = 0.0
    hard_b = soft_b = 0.0
    instructions: set[str] = set()
    columns = ["instruction_id", "correct", "step_completions", "step_labels_hard", "step_labels_soft",
               "completion_prompt_tokens", "completion_generated_tokens", "completions_unverifiable"]
    for batch in dataset.to_batches(columns=columns):
        c = batch.to_pydict()
        rows += batch.num_rows
        instructions.update(c["instruction_id"])
        correct_responses += sum(bool(x) for x in c["correct"])
        for comp, h, s in zip(c["step_completions"], c["step_labels_hard"], c["step_labels_soft"]):
            steps += len(comp)
            boundaries += len(comp) - 1
            completions += sum(comp[:-1])
            hard += sum(h)
            soft += sum(s)
            hard_b += sum(h[:-1])
            soft_b += sum(s[:-1])
        prompt_tok += sum(c["completion_prompt_tokens"])
        gen_tok += sum(c["completion_generated_tokens"])
        unverifiable += sum(c["completions_unverifiable"])
    return {
        "rows_labelled": rows,
        "instructions": len(instructions),
        "correct_responses": correct_responses,
        "steps": steps,
        "boundaries_sampled": boundaries,
        "completions": completions,
        "completion_prompt_tokens": prompt_tok,
        "completion_generated_tokens": gen_tok,
        "completions_unverifiable": unverifiable,
        "positive_fraction_hard": hard / steps if steps else None,
        "mean_soft_label": soft / steps if steps else None,
        # The same over the sampled boundaries only (the last step is the outcome label).
        "boundary_positive_fraction_hard": hard_b / boundaries if boundaries else None,
        "boundary_mean_soft_label": soft_b / boundaries if boundaries else None,
    }
