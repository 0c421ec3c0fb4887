"""Rollouts: instructions -> vLLM actor pool (N samples each) -> verifier actor pool -> Parquet shards.

The unit of work is a *shard*: `shard_size` consecutive instructions. A shard row flows through
three Ray Data stages, each a pool of actors (`map_batches` with `batch_size=1`):

    shard rows --> VLLMSampler (vllm.LLM, GPUs or CPUs) --> Verifier (task verifier, CPUs)
               --> write_shard (one Parquet file per shard, atomic rename) --> driver: stats only

so the driver never holds responses, and a killed run resumes by skipping shards whose file exists.

Why a Ray Data actor class around `vllm.LLM` and not `ray.data.llm`: `ray.data.llm` keeps only
`outputs[0]` of each request (silently dropping n-1 samples) and asks for GPUs unless given a CPU
placement group. We submit one request per sample with its own seed instead of one request with
`n` samples: every sample is then reproducible on its own (seed = f(run seed, instruction id,
sample index)), independent of batching and of which shards a resumed run redoes; vLLM's prefix
cache shares the prompt's KV cache across the N requests, so this costs no prompt recompute.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from prm_ray.compute import generation_compute, measure
from prm_ray.config import ConfigError, save_config, to_dict
from prm_ray.tasks import Instruction, get_task
from prm_ray.tasks.arith import ArithConfig

SCHEMA = pa.schema([
    ("instruction_id", pa.string()),
    ("prompt", pa.string()),  # the user-turn text (before the model's chat template)
    ("response", pa.string()),
    ("sample_index", pa.int32()),
    ("gold_answer", pa.string()),
    ("extracted_answer", pa.string()),  # null when the response gives no answer
    ("correct", pa.bool_()),
    ("verify_status", pa.string()),  # ok | no_answer | timeout | error
    ("num_tokens", pa.int32()),  # generated tokens, EOS included when produced
    ("cumulative_logprob", pa.float64()),  # sum of the sampled tokens' log-probs (raw model)
    ("finish_reason", pa.string()),  # stop (EOS) | length (hit max_tokens)
    ("model", pa.string()),
    ("seed", pa.int64()),
])
"""One row per response. Documented in docs/rollouts.md."""

META_FILE = "rollout_meta.json"
SUMMARY_FILE = "summary.json"
SKIPPED_FILE = "skipped_rows.json"
RUNS_FILE = "runs.jsonl"  # one line per invocation that produced shards: its timing


@dataclass
class SamplingConfig:
    n: int = 8
    # None: the policy card's rollout temperature (prm_ray_policy.json), else 1.0.
    temperature: float | None = None
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0


@dataclass
class EngineConfig:
    """The vLLM actor pool. Defaults fit a 2-core laptop; on a cluster set num_gpus/replicas."""

    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    accelerator_type: str | None = None  # e.g. "A100" (Ray accelerator type for the autoscaler)
    tensor_parallel_size: int = 1
    # "auto": bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), else float32.
    # Measured here at 25M params: bf16 1.33x fp32 (docs/bench_rollout.md).
    dtype: str = "auto"
    max_model_len: int | None = None
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    cpu_kvcache_gb: int = 1  # VLLM_CPU_KVCACHE_SPACE for CPU engines
    max_num_seqs: int = 256
    # CPU engines only: cores kept away from the model worker's OpenMP threads for vLLM's
    # engine-core process (VLLM_CPU_NUM_OF_RESERVED_CPU). vLLM reserves 1, which on a 2-core
    # machine runs the model single-threaded; 0 measured 1.19x faster here. None: vLLM's default.
    cpu_reserved_cpus: int | None = 0
    # None: on for GPU engines, off for CPU engines (vLLM 0.32 CPU crashes on chunked prefills of
    # seeded requests; see llm_kwargs). Off needs max_num_batched_tokens >= the context length.
    enable_chunked_prefill: bool | None = None
    max_num_batched_tokens: int | None = None  # None: vLLM's default


@dataclass
class VerifierConfig:
    replicas: int = 1
    num_cpus: float = 0.5
    timeout_s: float = 5.0  # per answer (math); a timeout is recorded as verify_status=timeout
    workers_per_replica: int = 1  # verification processes per actor (math)


@dataclass
class RolloutConfig:
    """Sample N responses per instruction with vLLM, verify them, write Parquet shards."""

    model: str = "artifacts/policy"
    out: str = "runs/rollouts"
    task: str = "arith"
    split: str = "train"
    instructions: str | None = None  # JSONL/Parquet file for --task math (default: MATH-500)
    on_bad_row: str = "skip"  # skip (count in the summary) | error
    limit: int | None = None  # take the first K instructions
    shard_size: int = 32  # instructions per output file (the unit of resume)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    arith: ArithConfig = field(default_factory=ArithConfig)
    ray_address: str | None = None  # None: RAY_ADDRESS, a running local cluster, or a new one
    progress: bool = True

    def __post_init__(self) -> None:
        if self.task not in ("arith", "math"):
            raise ConfigError(f"task must be 'arith' or 'math', got {self.task!r}")
        if self.on_bad_row not in ("skip", "error"):
            raise ConfigError(f"on_bad_row must be 'skip' or 'error', got {self.on_bad_row!r}")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.sampling.n < 1:
            raise ConfigError(f"sampling.n must be >= 1, got {self.sampling.n}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.engine.replicas < 1 or self.verifier.replicas < 1:
            raise ConfigError("engine.replicas and verifier.replicas must be >= 1")
        if self.engine.num_gpus and self.engine.num_gpus != self.engine.tensor_parallel_size:
            # The replica's actor holds the GPUs that vLLM's tensor-parallel workers run on.
            raise ConfigError(f"engine.num_gpus ({self.engine.num_gpus:g}) must equal "
                              f"engine.tensor_parallel_size ({self.engine.tensor_parallel_size})")


def make_task(cfg: RolloutConfig):
    if cfg.task == "arith":
        return get_task("arith", config=cfg.arith)
    return get_task("math", path=cfg.instructions, timeout_s=cfg.verifier.timeout_s,
                    num_workers=cfg.verifier.workers_per_replica, on_bad_row=cfg.on_bad_row)


def sample_seed(run_seed: int, instruction_id: str, sample_index: int) -> int:
    """A distinct, reproducible 63-bit seed per (run, instruction, sample)."""
    digest = hashlib.sha256(f"{run_seed}/{instruction_id}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def resolve_temperature(cfg: RolloutConfig) -> float:
    if cfg.sampling.temperature is not None:
        return cfg.sampling.temperature
    card = Path(cfg.model) / "prm_ray_policy.json"
    if card.exists():
        return float(json.loads(card.read_text())["rollout_temperature"])
    return 1.0


# --------------------------------------------------------------------------------------------
# Ray Data stages. Each receives and returns a one-row pyarrow table holding one shard.
# --------------------------------------------------------------------------------------------


def _one(batch: pa.Table) -> dict[str, Any]:
    if batch.num_rows != 1:
        raise RuntimeError(f"expected one shard per batch, got {batch.num_rows} rows")
    return batch.to_pylist()[0]


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matmul instructions (where bf16 beats fp32; elsewhere it is
    emulated and slower)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, num_gpus: float) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if num_gpus > 0 or cpu_has_native_bf16() else "float32"


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


class VLLMSampler:
    """A vLLM engine in a Ray actor; samples `n` responses per instruction of a shard."""

    def __init__(self, model: str, engine: dict, sampling: dict, temperature: float) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(engine["cpu_kvcache_gb"]))
        if engine["num_gpus"] == 0 and engine.get("cpu_reserved_cpus") is not None:
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(engine["cpu_reserved_cpus"]))
        from transformers import AutoTokenizer
        from vllm import LLM

        self.model_name = model
        self.sampling = sampling
        self.temperature = temperature
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        dtype = resolve_dtype(engine["dtype"], engine["num_gpus"])
        t0 = time.time()
        self.llm = LLM(**llm_kwargs(model, engine, seed=sampling["seed"]))
        self.startup_s = time.time() - t0
        self.dtype = dtype
        from transformers import AutoConfig

        self.max_len = engine["max_model_len"] or getattr(AutoConfig.from_pretrained(model),
                                                          "max_position_embeddings", None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from vllm import SamplingParams

        from prm_ray.policy import render_prompt

        shard = _one(batch)
        s = self.sampling
        requests, params, keys = [], [], []
        for iid, prompt in zip(shard["instruction_id"], shard["prompt"]):
            ids = self.tokenizer(render_prompt(self.tokenizer, prompt), add_special_tokens=False)["input_ids"]
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
        from prm_ray.config import from_dict

        self.task = make_task(from_dict(RolloutConfig, cfg))

    def __call__(self, batch: pa.Table) -> pa.Table:
        shard = _one(batch)
        gold = dict(zip(shard["instruction_id"], shard["gold_answer"]))
        t0 = time.time()
        verdicts = self.task.verify_batch(shard["response"], [gold[i] for i in shard["sample_instruction_id"]])
        shard["verify_seconds"] = time.time() - t0
        shard["correct"] = [v.correct for v in verdicts]
        shard["verify_status"] = [v.status.value for v in verdicts]
        shard["extracted_answer"] = [v.extracted_answer for v in verdicts]
        return pa.Table.from_pylist([shard])


def shard_path(out: Path, shard_id: int) -> Path:
    return out / "data" / f"shard-{shard_id:06d}.parquet"


def write_shard(batch: pa.Table, out: str) -> pa.Table:
    """Write one shard's rows (one per response) to Parquet atomically; return its stats."""
    shard = _one(batch)
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
        "correct": shard["correct"],
        "verify_status": shard["verify_status"],
        "num_tokens": shard["num_tokens"],
        "cumulative_logprob": shard["cumulative_logprob"],
        "finish_reason": shard["finish_reason"],
        "model": [shard["model"]] * len(iids),
        "seed": shard["seed"],
    }, schema=SCHEMA)
    path = shard_path(Path(out), shard["shard_id"])
    # A leading dot hides a half-written file from Parquet dataset discovery.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # a killed run never leaves a half-written shard behind
    return pa.Table.from_pylist([{
        "shard_id": shard["shard_id"], "responses": len(iids),
        "generated_tokens": sum(shard["num_tokens"]), "generate_seconds": shard["generate_seconds"],
        "engine_startup_seconds": shard["engine_startup_seconds"],
        "verify_seconds": shard["verify_seconds"], "engine_dtype": shard.get("engine_dtype", "unknown"),
    }])


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _shards(instructions: list[Instruction], size: int) -> Iterator[dict]:
    for sid, start in enumerate(range(0, len(instructions), size)):
        chunk = instructions[start : start + size]
        yield {
            "shard_id": sid,
            "instruction_id": [i.id for i in chunk],
            "prompt": [i.prompt for i in chunk],
            "gold_answer": [i.answer for i in chunk],
        }


def _check_meta(out: Path, meta: dict) -> None:
    """Refuse to mix rollouts made with different settings into one dataset."""
    path = out / META_FILE
    if not path.exists():
        return
    old = json.loads(path.read_text())
    keys = ("model", "task", "split", "instructions", "shard_size", "sampling", "arith", "limit")
    for key in keys:
        if old.get("config", {}).get(key) != meta["config"].get(key):
            raise ConfigError(
                f"{out} already holds rollouts made with a different '{key}' "
                f"({old['config'].get(key)!r} vs {meta['config'].get(key)!r}); "
                "use another --out or delete it"
            )


def init_ray(address: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=False,
             logging_level="WARNING")


def stream_shards(todo: list[dict], stats: list[dict], *, out: Path, engine: EngineConfig, verifier: VerifierConfig,
                  sampler_cls: type, sampler_kwargs: dict, verifier_cls: type, verifier_kwargs: dict, writer,
                  total: int, desc: str, progress: bool, rate) -> list[dict]:
    """The shard pipeline of rollouts and of step labels: sampler actors (vLLM, GPUs or CPUs) ->
    verifier actors -> a per-shard atomic writer. The driver only sees each shard's stats, which
    are appended to ``stats`` as they arrive (so a caller still has them if the pipeline fails)."""
    import ray
    from tqdm.auto import tqdm

    engine_args: dict[str, Any] = {"num_cpus": engine.num_cpus, "num_gpus": engine.num_gpus}
    if engine.accelerator_type:
        engine_args["accelerator_type"] = engine.accelerator_type
    ds = ray.data.from_items(todo, override_num_blocks=len(todo))
    ds = ds.map_batches(sampler_cls, batch_size=1, batch_format="pyarrow", concurrency=engine.replicas,
                        fn_constructor_kwargs=sampler_kwargs, **engine_args)
    ds = ds.map_batches(verifier_cls, batch_size=1, batch_format="pyarrow", concurrency=verifier.replicas,
                        num_cpus=verifier.num_cpus, fn_constructor_kwargs=verifier_kwargs)
    ds = ds.map_batches(writer, batch_size=1, batch_format="pyarrow", num_cpus=0.1, fn_kwargs={"out": str(out)})
    with tqdm(total=total, desc=desc, unit="resp", disable=not progress) as bar:
        for row in ds.iter_rows():
            stats.append(row)
            bar.update(row["responses"])
            bar.set_postfix(rate(stats))
    return stats


def run_rollouts(cfg: RolloutConfig, sampler_cls: type = None) -> dict:
    """Run (or resume) a rollout job; returns the summary (also saved as summary.json).

    `sampler_cls` replaces the vLLM stage (same constructor and call signature); tests use it to
    push scripted responses through the real verifier and writer stages.
    """
    sampler_cls = sampler_cls or VLLMSampler
    out = Path(cfg.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    task = make_task(cfg)
    instructions = list(task.instructions(cfg.split, limit=cfg.limit))
    skipped = list(getattr(task, "skipped_rows", []))
    if not instructions:
        raise ValueError(f"no instructions to roll out (task {cfg.task}, split {cfg.split}, "
                         f"{len(skipped)} bad rows skipped)")
    temperature = resolve_temperature(cfg)
    meta = {"config": to_dict(cfg), "temperature": temperature, "schema": [f.name for f in SCHEMA],
            "num_instructions": len(instructions), "num_shards": -(-len(instructions) // cfg.shard_size)}
    _check_meta(out, meta)
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    save_config(cfg, out / "config.yaml")
    (out / SKIPPED_FILE).write_text(json.dumps([list(s) for s in skipped], indent=1))

    todo = [s for s in _shards(instructions, cfg.shard_size) if not shard_path(out, s["shard_id"]).exists()]
    stats: list[dict] = []
    t0 = time.time()
    with measure() as clock:
        if todo:
            init_ray(cfg.ray_address)
            stream_shards(
                todo, stats, out=out, engine=cfg.engine, verifier=cfg.verifier, sampler_cls=sampler_cls,
                sampler_kwargs={"model": cfg.model, "engine": vars(cfg.engine), "sampling": vars(cfg.sampling),
                                "temperature": temperature},
                verifier_cls=Verifier, verifier_kwargs={"cfg": to_dict(cfg)}, writer=write_shard,
                total=sum(len(s["instruction_id"]) for s in todo) * cfg.sampling.n,
                desc=f"rollouts ({len(todo)} shards)", progress=cfg.progress,
                rate=lambda st: {"tok_s": f"{sum(s['generated_tokens'] for s in st) / max(sum(s['generate_seconds'] for s in st), 1e-9):.0f}"})
    summary = summarize(out, skipped_rows=len(skipped))
    gen_s = sum(s["generate_seconds"] for s in stats)
    summary["this_run"] = {
        "shards_done": len(stats), "shards_reused": meta["num_shards"] - len(todo),
        "wall_seconds": time.time() - t0, "generate_seconds": gen_s, "cpu_seconds": clock["cpu_s"],
        "engine_startup_seconds": sum(s["engine_startup_seconds"] for s in stats),
        "verify_seconds": sum(s["verify_seconds"] for s in stats),
        "engine_dtypes": sorted({s["engine_dtype"] for s in stats}),  # "auto" resolved per actor
        "generated_tokens": sum(s["generated_tokens"] for s in stats),
        # Per engine busy-second; with several replicas the aggregate rate is higher.
        "generated_tokens_per_s": sum(s["generated_tokens"] for s in stats) / gen_s if gen_s else None,
    }
    summary["temperature"] = temperature
    # Every invocation that did work is kept, so the cost of producing the dataset survives a
    # resume and later reuse (compute accounting reads the totals).
    history = out / RUNS_FILE
    if stats:
        with open(history, "a") as f:
            f.write(json.dumps(summary["this_run"]) + "\n")
    runs = [json.loads(x) for x in history.read_text().splitlines()] if history.exists() else []
    summary["all_runs"] = {"runs": len(runs), **{k: sum(r.get(k) or 0.0 for r in runs) for k in (
        "wall_seconds", "cpu_seconds", "generate_seconds", "verify_seconds", "engine_startup_seconds",
        "generated_tokens")}} if runs else None
    try:  # FLOPs of the whole set (prm_ray/compute.py)
        summary["compute"] = generation_compute(out, cfg.model)
    except (OSError, ValueError) as exc:  # e.g. a scripted test sampler: no model to count with
        summary["compute"] = {"error": f"cannot load {cfg.model!r} to count tokens and parameters: {exc}"}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def summarize(out: str | Path, skipped_rows: int = 0) -> dict:
    """Summary numbers recomputed from the Parquet shards (streamed column-wise, not in full)."""
    import pyarrow.dataset as pads

    dataset = pads.dataset(str(Path(out) / "data"), format="parquet")
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
