"""Rollouts: instructions -> vLLM actor pool (N samples each) -> verifier actor pool -> Parquet shards.

The shard pipeline (:mod:`prm_ray.stages.shards`) streams shards of ``shard_size`` instructions
through :class:`VLLMSampler`, :class:`Verifier` and :func:`write_shard`; a killed run resumes by
skipping shards whose file exists, and an output directory made with other settings is refused.

Why a Ray Data actor class around ``vllm.LLM`` and not ``ray.data.llm``: ``ray.data.llm`` keeps
only ``outputs[0]`` of each request (silently dropping n-1 samples) and asks for GPUs unless given
a CPU placement group. We submit one request per sample with its own seed instead of one request
with ``n`` samples: every sample is then reproducible on its own (seed = f(run seed, instruction
id, sample index)), independent of batching and of which shards a resumed run redoes; vLLM's
prefix cache shares the prompt's KV cache across the N requests, so this costs no prompt recompute.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads

from prm_ray.artifacts import (
    ROLLOUT_META,
    RUNS_FILE,
    SKIPPED_FILE,
    SUMMARY_FILE,
    append_run,
    check_settings,
    data_dir,
    read_json,
    read_jsonl,
    rollout_temperature,
    shard_path,
    write_json,
    write_parquet_atomic,
)
from prm_ray.config import ConfigError, from_dict, param, save_config, to_dict
from prm_ray.core.flops import forward_flops
from prm_ray.resources import Resources, check_dtype, resolve_dtype
from prm_ray.stages.runtime import init_ray, measure
from prm_ray.stages.shards import one_shard, stream_shards
from prm_ray.tasks import Instruction, Task, get_task
from prm_ray.tasks.arith import ArithConfig

__all__ = ["SCHEMA", "EngineConfig", "RolloutConfig", "SamplingConfig", "VLLMSampler", "Verifier", "VerifierConfig",
           "engine_environment", "llm_kwargs", "make_task", "run_rollouts", "sample_seed", "summarize", "write_shard"]

SCHEMA = pa.schema([
    ("instruction_id", pa.string()),
    ("prompt", pa.string()),  # the user-turn text (before the model's chat template)
    ("response", pa.string()),
    ("sample_index", pa.int32()),
    ("gold_answer", pa.string()),
    ("extracted_answer", pa.string()),  # null when the response gives no answer
    ("answer_group", pa.string()),  # the vote key: equal for equivalent answers (Task.answer_groups)
    ("correct", pa.bool_()),
    ("verify_status", pa.string()),  # ok | no_answer | timeout | error
    ("num_tokens", pa.int32()),  # generated tokens, EOS included when produced
    ("cumulative_logprob", pa.float64()),  # sum of the sampled tokens' log-probs (raw model)
    ("finish_reason", pa.string()),  # stop (EOS) | length (hit max_tokens)
    ("model", pa.string()),
    ("seed", pa.int64()),
])
"""One row per response. Documented in docs/rollouts.md."""

SETTINGS = ("model", "task", "split", "instructions", "prompt_suffix", "shard_size", "sampling", "arith", "limit")
"""The fields that decide a rollout set's rows: another value refuses to reuse its directory."""


@dataclass
class SamplingConfig:
    """How each response is sampled (one vLLM request per sample, each with its own seed)."""

    n: int = param(8, "responses per instruction")
    temperature: float | None = param(None, "null: the policy card's calibrated rollout temperature "
                                            "(prm_ray_policy.json), else 1.0")
    top_p: float = param(1.0, "nucleus sampling")
    max_tokens: int = param(256, "generated tokens per response at most (also capped so prompt + response "
                                 "+ EOS fits the context)")
    seed: int = param(0, "run seed; each sample's seed is sha256(seed, instruction id, sample index)")


@dataclass
class EngineConfig(Resources):
    """The vLLM actor pool. Defaults fit a 2-core laptop; on a cluster set num_gpus and replicas."""

    tensor_parallel_size: int = param(1, "GPUs one engine shards the model over (= num_gpus)")
    dtype: str = param("auto", "auto: bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), else "
                               "float32 (bf16 is emulated and slower there)")
    max_model_len: int | None = param(None, "the engine's context; null: the model's")
    enforce_eager: bool = param(True, "false compiles the model: faster generation, longer start-up "
                                      "(docs/bench_rollout.md)")
    enable_prefix_caching: bool = param(True, "share a prompt's KV cache across its N samples")
    gpu_memory_utilization: float = param(0.9, "vLLM's share of each GPU's memory")
    cpu_kvcache_gb: int = param(1, "KV cache of a CPU engine in GiB (VLLM_CPU_KVCACHE_SPACE)")
    max_num_seqs: int = param(256, "sequences an engine runs at once")
    cpu_reserved_cpus: int | None = param(0, "CPU engines: cores kept from the model's OpenMP threads for "
                                             "vLLM's engine-core process (VLLM_CPU_NUM_OF_RESERVED_CPU); vLLM's "
                                             "own default, 1, runs a 2-core machine single-threaded (0 measured "
                                             "1.19x faster); null: vLLM's default")
    enable_chunked_prefill: bool | None = param(None, "null: on for GPU engines, off for CPU engines (vLLM 0.32's "
                                                      "CPU runner crashes on chunked prefills of seeded requests)")
    in_process: bool | None = param(None, "run vLLM's engine core and model worker in the actor's own process "
                                          "(VLLM_ENABLE_V1_MULTIPROCESSING=0); null: yes for CPU engines (here: "
                                          "start-up about 3 s instead of 20 s, generation 1.1-1.6x faster, the "
                                          "same samples: docs/rollouts.md), no for GPU engines (a separate process "
                                          "overlaps scheduling with the GPU)")
    max_num_batched_tokens: int | None = param(None, "tokens per engine step; null: vLLM's default (with "
                                                     "chunked prefill off it must cover the context)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threads is not None:
            raise ConfigError("engine.threads: vLLM sizes its own threads (see engine.cpu_reserved_cpus); leave it null")
        check_dtype(self.dtype, "engine.dtype")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"engine.max_model_len must be >= 2 or null, got {self.max_model_len}")
        if self.num_gpus and self.num_gpus != self.tensor_parallel_size:
            # The replica's actor holds the GPUs that vLLM's tensor-parallel workers run on.
            raise ConfigError(f"engine.num_gpus ({self.num_gpus:g}) must equal "
                              f"engine.tensor_parallel_size ({self.tensor_parallel_size})")


@dataclass
class VerifierConfig(Resources):
    """The verifier actor pool (the task's verifier; math: a deadline-enforcing process pool)."""

    num_cpus: float = 0.5
    timeout_s: float = param(5.0, "per answer (math); a timeout is recorded as verify_status=timeout")
    workers_per_replica: int = param(1, "verification processes per actor (math)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threads is not None:
            raise ConfigError("verifier.threads: verifiers run no torch; leave it null (workers_per_replica "
                              "sets their processes)")
        if self.timeout_s <= 0:
            raise ConfigError(f"verifier.timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class RolloutConfig:
    """Sample N responses per instruction with vLLM, verify them, write Parquet shards."""

    model: str = param("artifacts/policy", "the policy: a local Hugging Face directory or a hub id")
    out: str = param("runs/rollouts", "output directory (the rollout set)")
    task: str = param("arith", "arith (the embedded world) or math (MATH-style files)")
    split: str = param("train", "arith: train, validation or test; math: served whatever it is called")
    instructions: str | None = param(None, "math: a JSONL/Parquet file with problem and answer; null: MATH-500")
    on_bad_row: str = param("skip", "a bad instruction row is skipped and counted (skip) or stops the run (error)")
    prompt_suffix: str | None = param(None, "math: the instruction appended to each problem in the user turn "
                                      "(the rollouts' prompt column holds problem + suffix); null: the task's default")
    limit: int | None = param(None, "take the first K instructions; null: all")
    shard_size: int = param(32, "instructions per output file (the unit of resume)")
    sampling: SamplingConfig = param(factory=SamplingConfig, help="")
    engine: EngineConfig = param(factory=EngineConfig, help="")
    verifier: VerifierConfig = param(factory=VerifierConfig, help="")
    arith: ArithConfig = param(factory=ArithConfig, help="")
    overwrite: bool = param(False, "replace an output directory made with other settings (else refused)")
    ray_address: str | None = param(None, "null: RAY_ADDRESS, a running local cluster, or a new one")
    progress: bool = param(True, "show a progress bar")

    def __post_init__(self) -> None:
        if self.task not in ("arith", "math"):
            raise ConfigError(f"task must be 'arith' or 'math', got {self.task!r}")
        if self.task != "math" and self.prompt_suffix is not None:
            raise ConfigError(f"prompt_suffix applies to task math only (task is {self.task!r}); leave it null")
        if self.on_bad_row not in ("skip", "error"):
            raise ConfigError(f"on_bad_row must be 'skip' or 'error', got {self.on_bad_row!r}")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.sampling.n < 1:
            raise ConfigError(f"sampling.n must be >= 1, got {self.sampling.n}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")

    def resource_requests(self, prefix: str = "") -> list:
        return [self.engine.request(f"{prefix}engine"), self.verifier.request(f"{prefix}verifier")]


def make_task(cfg: RolloutConfig) -> Task:
    if cfg.task == "arith":
        return get_task("arith", config=cfg.arith)
    suffix = {} if cfg.prompt_suffix is None else {"prompt_suffix": cfg.prompt_suffix}
    return get_task("math", path=cfg.instructions, timeout_s=cfg.verifier.timeout_s,
                    num_workers=cfg.verifier.workers_per_replica, on_bad_row=cfg.on_bad_row, **suffix)


def sample_seed(run_seed: int, instruction_id: str, sample_index: int) -> int:
    """A distinct, reproducible 63-bit seed per (run, instruction, sample)."""
    digest = hashlib.sha256(f"{run_seed}/{instruction_id}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def resolve_temperature(cfg: RolloutConfig) -> float:
    if cfg.sampling.temperature is not None:
        return cfg.sampling.temperature
    card = rollout_temperature(cfg.model)
    return card if card is not None else 1.0


def engine_environment(engine: dict) -> dict[str, str]:
    """The environment an engine actor starts with: how vLLM takes an ``EngineConfig``'s CPU settings.

    In process (``in_process``, the default on CPUs), the model runs on the actor's own OpenMP
    threads, which Ray would cap at the actor's ``num_cpus``; they get the cores vLLM's separate
    worker process would bind (this node's cores minus ``cpu_reserved_cpus``), so the samples are
    the same bit for bit, only sooner.
    """
    env = {"VLLM_CPU_KVCACHE_SPACE": str(engine["cpu_kvcache_gb"])}
    cpu = engine["num_gpus"] == 0
    reserved = engine.get("cpu_reserved_cpus")
    if cpu and reserved is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved)
    in_process = engine.get("in_process")
    if in_process if in_process is not None else cpu:
        # vLLM otherwise spawns an engine-core process and a worker process, each importing vLLM
        # again (about 9 s apiece here), and on a 2-core machine they compete with each other.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if cpu:
            cores = len(os.sched_getaffinity(0)) - (1 if reserved is None else reserved)
            env["OMP_NUM_THREADS"] = str(max(1, cores))
    return env


def llm_kwargs(model: str, engine: dict, seed: int) -> dict:
    """``vllm.LLM`` arguments for an ``EngineConfig`` (as a dict)."""
    chunked = engine.get("enable_chunked_prefill")
    if chunked is None:
        # vLLM 0.32's CPU runner crashes ("CPU Generator does not use offset") when a prompt's
        # prefill is split across steps and its request has a seed: it rewinds the request's
        # generator, which CPU generators cannot do. Every request here has a seed, and a batch of
        # many prompts (step-label completions: prompt + prefix) does get split. GPUs are fine.
        chunked = engine["num_gpus"] > 0
    kwargs = dict(model=model, dtype=resolve_dtype(engine["dtype"], engine["num_gpus"]),
                  enforce_eager=engine["enforce_eager"], tensor_parallel_size=engine["tensor_parallel_size"],
                  max_model_len=engine["max_model_len"], enable_prefix_caching=engine["enable_prefix_caching"],
                  gpu_memory_utilization=engine["gpu_memory_utilization"], max_num_seqs=engine["max_num_seqs"],
                  enable_chunked_prefill=chunked, seed=seed)
    if engine.get("max_num_batched_tokens"):
        kwargs["max_num_batched_tokens"] = engine["max_num_batched_tokens"]
    return kwargs


# --------------------------------------------------------------------------------------------
# Ray Data stages. Each receives and returns a one-row pyarrow table holding one shard.
# --------------------------------------------------------------------------------------------


class VLLMSampler:
    """A vLLM engine in a Ray actor; samples ``n`` responses per instruction of a shard.

    Constructor and call contract (also of ``sampler_cls`` replacements in tests):
    ``(model, engine, sampling, temperature)``; ``__call__(shard) -> shard`` adding
    ``sample_instruction_id, sample_index, seed, model, response, num_tokens, cumulative_logprob,
    finish_reason, generate_seconds, engine_startup_seconds, engine_dtype``.
    """

    def __init__(self, model: str, engine: dict, sampling: dict, temperature: float) -> None:
        # The actor starts with engine_environment(engine) (stream_shards). Heavy imports live in
        # the methods that need them: this module also runs in verifier actors and writer tasks,
        # which need neither vLLM nor torch (seconds of imports per process).
        from vllm import LLM

        from prm_ray.models import context_length, load_tokenizer

        self.model_name = model
        self.sampling = sampling
        self.temperature = temperature
        self.tokenizer = load_tokenizer(model)
        self.dtype = resolve_dtype(engine["dtype"], engine["num_gpus"])
        t0 = time.time()
        self.llm = LLM(**llm_kwargs(model, engine, seed=sampling["seed"]))
        self.startup_s = time.time() - t0
        self.max_len = context_length(model, engine["max_model_len"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        from vllm import SamplingParams

        from prm_ray.tokens import prompt_ids  # the engine actor only (see __init__)

        shard = one_shard(batch)
        s = self.sampling
        requests, params, keys = [], [], []
        for iid, prompt in zip(shard["instruction_id"], shard["prompt"]):
            ids = prompt_ids(self.tokenizer, prompt)
            max_tokens = s["max_tokens"]
            if self.max_len:
                # Leave room for the EOS that scoring and training append to every response, so
                # each sampled response fits the model's context there too.
                max_tokens = max(1, min(max_tokens, self.max_len - len(ids) - 1))
            for j in range(s["n"]):
                seed = sample_seed(s["seed"], iid, j)
                requests.append({"prompt_token_ids": ids})
                params.append(SamplingParams(n=1, temperature=self.temperature, top_p=s["top_p"],
                                             max_tokens=max_tokens, seed=seed, logprobs=0))
                keys.append((iid, j, seed))
        t0 = time.time()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        gen_s = time.time() - t0
        responses = {"response": [], "num_tokens": [], "cumulative_logprob": [], "finish_reason": []}
        for out in outputs:
            o = out.outputs[0]
            responses["response"].append(o.text)
            responses["num_tokens"].append(len(o.token_ids))
            responses["cumulative_logprob"].append(o.cumulative_logprob)
            responses["finish_reason"].append(o.finish_reason)
        shard.update(
            sample_instruction_id=[k[0] for k in keys], sample_index=[k[1] for k in keys],
            seed=[k[2] for k in keys], model=self.model_name, generate_seconds=gen_s,
            engine_startup_seconds=self.startup_s, engine_dtype=self.dtype, **responses,
        )
        self.startup_s = 0.0  # count start-up once per actor
        return pa.Table.from_pylist([shard])


class Verifier:
    """The task's verifier in a Ray actor (math: a deadline-enforcing process pool per actor)."""

    def __init__(self, cfg: dict) -> None:
        self.task = make_task(from_dict(RolloutConfig, cfg))

    def __call__(self, batch: pa.Table) -> pa.Table:
        shard = one_shard(batch)
        gold = dict(zip(shard["instruction_id"], shard["gold_answer"]))
        t0 = time.time()
        verdicts = self.task.verify_batch(shard["response"], [gold[i] for i in shard["sample_instruction_id"]])
        # Each instruction's samples are in this shard: their answers are grouped together.
        rows: dict[str, list[int]] = {}
        for r, iid in enumerate(shard["sample_instruction_id"]):
            rows.setdefault(iid, []).append(r)
        timeouts = self.task.group_timeouts
        keys = self.task.answer_groups([([verdicts[r] for r in rs], gold[iid]) for iid, rs in rows.items()])
        groups: list[str | None] = [None] * len(verdicts)
        for rs, ks in zip(rows.values(), keys):
            for r, k in zip(rs, ks):
                groups[r] = k
        shard["verify_seconds"] = time.time() - t0
        shard["group_timeouts"] = self.task.group_timeouts - timeouts
        shard["correct"] = [v.correct for v in verdicts]
        shard["verify_status"] = [v.status.value for v in verdicts]
        shard["extracted_answer"] = [v.extracted_answer for v in verdicts]
        shard["answer_group"] = groups
        return pa.Table.from_pylist([shard])


def write_shard(batch: pa.Table, out: str) -> pa.Table:
    """Write one shard's rows (one per response) to Parquet atomically; return its stats."""
    shard = one_shard(batch)
    prompt = dict(zip(shard["instruction_id"], shard["prompt"]))
    gold = dict(zip(shard["instruction_id"], shard["gold_answer"]))
    iids = shard["sample_instruction_id"]
    table = pa.table({
        "instruction_id": iids,
        "prompt": [prompt[i] for i in iids],
        "response": shard["response"],
        "sample_index": shard["sample_index"],
        "gold_answer": [gold[i] for i in iids],
        "extracted_answer": shard["extracted_answer"],
        "answer_group": shard["answer_group"],
        "correct": shard["correct"],
        "verify_status": shard["verify_status"],
        "num_tokens": shard["num_tokens"],
        "cumulative_logprob": shard["cumulative_logprob"],
        "finish_reason": shard["finish_reason"],
        "model": [shard["model"]] * len(iids),
        "seed": shard["seed"],
    }, schema=SCHEMA)
    write_parquet_atomic(table, shard_path(Path(out), shard["shard_id"]))
    return pa.Table.from_pylist([{
        "shard_id": shard["shard_id"], "responses": len(iids),
        "generated_tokens": sum(shard["num_tokens"]), "generate_seconds": shard["generate_seconds"],
        "engine_startup_seconds": shard["engine_startup_seconds"],
        "verify_seconds": shard["verify_seconds"], "engine_dtype": shard.get("engine_dtype", "unknown"),
        "group_timeouts": shard["group_timeouts"],
    }])


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _shards(instructions: list[Instruction], size: int, task: Task) -> Iterator[dict]:
    """Shards of instructions; ``prompt`` is the exact user-turn text the policy is sent (the task's
    :meth:`~prm_ray.tasks.Task.format_instruction`), which every later stage scores as is."""
    for sid, start in enumerate(range(0, len(instructions), size)):
        chunk = instructions[start : start + size]
        yield {
            "shard_id": sid,
            "instruction_id": [i.id for i in chunk],
            "prompt": [task.format_instruction(i) for i in chunk],
            "gold_answer": [i.answer for i in chunk],
        }


def generation_compute(out: Path, model: str) -> dict:
    """The compute of sampling a rollout set: ``2 * params * (prompt + generated tokens)``."""
    from prm_ray.models import count_parameters, load_tokenizer  # the driver only (see VLLMSampler)
    from prm_ray.tokens import prompt_token_counts

    table = pads.dataset(str(data_dir(out)), format="parquet").to_table(columns=["prompt", "num_tokens"])
    prompt = sum(prompt_token_counts(load_tokenizer(model), table.column("prompt").to_pylist()))
    generated = sum(table.column("num_tokens").to_pylist())
    params = count_parameters(model)
    return {"params": params, "prompt_tokens": prompt, "generated_tokens": generated,
            "flops": forward_flops(params, prompt + generated)}


def _check_resume_dtype(out: Path, dtype: str) -> None:
    """Refuse to resume a rollout set in another precision than its shards were sampled in: bf16
    and fp32 engines sample different responses from the same seeds, so the set would mix two
    policies' samples. ``engine.dtype: auto`` resolves per machine, so a resume on a CPU with(out)
    native bf16 would do so silently."""
    made = sorted({d for r in read_jsonl(out / RUNS_FILE) for d in r.get("engine_dtypes", []) if d != "unknown"})
    if made and made != [dtype]:
        raise ConfigError(f"{out} holds responses sampled in {', '.join(made)}; this run's engines would sample in "
                          f"{dtype} (engine.dtype resolves 'auto' per machine). Set engine.dtype: {made[0]} to "
                          "resume it, or use another output directory")


def run_rollouts(cfg: RolloutConfig, sampler_cls: type | None = None) -> dict:
    """Run (or resume) a rollout job; returns the summary (also saved as summary.json).

    ``sampler_cls`` replaces the vLLM stage (same constructor and call contract as
    :class:`VLLMSampler`); tests use it to push scripted responses through the real verifier and
    writer stages.
    """
    sampler_cls = sampler_cls or VLLMSampler
    out = Path(cfg.out)
    task = make_task(cfg)
    instructions = list(task.instructions(cfg.split, limit=cfg.limit))
    skipped = list(getattr(task, "skipped_rows", []))
    if not instructions:
        raise ValueError(f"no instructions to roll out (task {cfg.task}, split {cfg.split}, "
                         f"{len(skipped)} bad rows skipped)")
    temperature = resolve_temperature(cfg)
    config = to_dict(cfg)
    meta = {"config": config, "settings": {k: config[k] for k in SETTINGS}, "temperature": temperature,
            "schema": SCHEMA.names, "num_instructions": len(instructions),
            "num_shards": -(-len(instructions) // cfg.shard_size)}
    old = read_json(out / ROLLOUT_META)
    check_settings(out, old and old["settings"], meta["settings"], what="rollouts", overwrite=cfg.overwrite)
    data_dir(out).mkdir(parents=True, exist_ok=True)
    write_json(out / ROLLOUT_META, meta)
    save_config(cfg, out / "config.yaml")
    (out / SKIPPED_FILE).write_text(json.dumps([list(s) for s in skipped], indent=1))

    todo = [s for s in _shards(instructions, cfg.shard_size, task) if not shard_path(out, s["shard_id"]).exists()]
    if todo:
        _check_resume_dtype(out, resolve_dtype(cfg.engine.dtype, cfg.engine.num_gpus))
    stats: list[dict] = []
    with measure() as clock:
        if todo:
            init_ray(cfg.ray_address)
            stream_shards(
                todo, stats, out=out, engine=cfg.engine, engine_env=engine_environment(vars(cfg.engine)),
                verifier=cfg.verifier, sampler_cls=sampler_cls,
                sampler_kwargs={"model": cfg.model, "engine": vars(cfg.engine), "sampling": vars(cfg.sampling),
                                "temperature": temperature},
                verifier_cls=Verifier, verifier_kwargs={"cfg": config}, writer=write_shard,
                total=sum(len(s["instruction_id"]) for s in todo) * cfg.sampling.n,
                desc=f"rollouts ({len(todo)} shards)", progress=cfg.progress,
                rate=lambda st: {"tok_s": f"{sum(s['generated_tokens'] for s in st) / max(sum(s['generate_seconds'] for s in st), 1e-9):.0f}"})
    summary = summarize(out, skipped_rows=len(skipped))
    gen_s = sum(s["generate_seconds"] for s in stats)
    summary["this_run"] = {
        "shards_done": len(stats), "shards_reused": meta["num_shards"] - len(todo),
        "wall_seconds": clock["wall_s"], "generate_seconds": gen_s, "cpu_seconds": clock["cpu_s"],
        "engine_startup_seconds": sum(s["engine_startup_seconds"] for s in stats),
        "verify_seconds": sum(s["verify_seconds"] for s in stats),
        # answer comparisons that hit the verifier's deadline: those answers vote apart
        "answer_group_timeouts": sum(s["group_timeouts"] for s in stats),
        "engine_dtypes": sorted({s["engine_dtype"] for s in stats}),  # "auto" resolved per actor
        "generated_tokens": sum(s["generated_tokens"] for s in stats),
        # Per engine busy-second; with several replicas the aggregate rate is higher.
        "generated_tokens_per_s": sum(s["generated_tokens"] for s in stats) / gen_s if gen_s else None,
    }
    summary["temperature"] = temperature
    # Every invocation that did work is kept, so the cost of producing the dataset survives a
    # resume and later reuse (compute accounting reads the totals).
    runs = append_run(out, summary["this_run"]) if stats else read_jsonl(out / RUNS_FILE)
    summary["all_runs"] = {"runs": len(runs), **{k: sum(r.get(k) or 0.0 for r in runs) for k in (
        "wall_seconds", "cpu_seconds", "generate_seconds", "verify_seconds", "engine_startup_seconds",
        "generated_tokens")}} if runs else None
    try:  # FLOPs of the whole set (prm_ray/core/flops.py)
        summary["compute"] = generation_compute(out, cfg.model)
    except (OSError, ValueError) as exc:  # e.g. a scripted test sampler: no model to count with
        summary["compute"] = {"error": f"cannot load {cfg.model!r} to count tokens and parameters: {exc}"}
    write_json(out / SUMMARY_FILE, summary)
    return summary


def summarize(out: str | Path, skipped_rows: int = 0) -> dict:
    """Summary numbers recomputed from the Parquet shards (streamed column-wise, not in full)."""
    dataset = pads.dataset(str(data_dir(Path(out))), format="parquet")
    per_inst: dict[str, list[int]] = {}
    status: Counter = Counter()
    responses = tokens = 0
    for batch in dataset.to_batches(columns=["instruction_id", "correct", "verify_status", "num_tokens"]):
        cols = batch.to_pydict()
        for iid, ok in zip(cols["instruction_id"], cols["correct"]):
            acc = per_inst.setdefault(iid, [0, 0])
            acc[0] += bool(ok)
            acc[1] += 1
        status.update(cols["verify_status"])
        responses += batch.num_rows
        tokens += sum(cols["num_tokens"])
    n_inst = len(per_inst)
    return {
        "instructions": n_inst,
        "responses": responses,
        "pass@1": sum(c / n for c, n in per_inst.values()) / n_inst if n_inst else None,
        "pass@N": sum(c > 0 for c, _ in per_inst.values()) / n_inst if n_inst else None,
        "verify_status": dict(status),
        "generated_tokens_total": tokens,
        "skipped_instruction_rows": skipped_rows,
    }
