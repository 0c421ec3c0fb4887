"""Rollout throughput: the Ray/vLLM pipeline against plain `transformers` `generate`, in one run.

    .venv/bin/python bench/rollout_throughput.py            # full run (~7 min on 2 idle cores)
    .venv/bin/python bench/rollout_throughput.py --quick    # smoke run (~3 min)
    .venv/bin/python bench/rollout_throughput.py --config my_bench.yaml --out /tmp/r.json

Flags are the fields of RolloutBenchConfig below (`--help` lists them with their defaults); list
fields take comma-separated values (`--hf_batch 64,128`).

What one run measures (see docs/bench_rollout.md for the interpretation):

1. the machine's matmul peak (2048x2048 fp32 and bf16, torch, 2 threads);
2. `transformers` `generate` (batched, sampling, fp32 and bf16) on the default policy
   (artifacts/policy) and on a ~25M-parameter Llama of the same architecture (random init);
3. the real pipeline, `prm_ray.stages.rollout.run_rollouts(RolloutConfig(...))`, on the same prompts
   (task arith, split validation), N, temperature and max tokens, for several engine settings;
4. the driver's peak RSS for 1,000 vs 10,000 instructions (one subprocess per size).

Workload, identical for both engines of one model size: the first `--prompts` (default policy) or
`--prompts_big` (25M model) validation prompts, `--n` samples each, the policy card's rollout
temperature, top_p 1, top_k off, `--max_tokens`.
The default policy stops at its own EOS. The random-init 25M model has no EOS behaviour worth the
name, so every (prompt, sample) gets a fixed length taken from the default policy's measured
response lengths in this run (its `generate` fp32 run, EOS included): vLLM gets
`min_tokens = max_tokens = L` per request, `generate` gets EOS suppressed and a per-row stopping
criterion at L. Both engines then produce exactly the same variable-length token counts.

The pipeline is run unchanged; `sampler_cls` is a thin subclass of `VLLMSampler` that (a) sets
vLLM CPU environment variables in the actor before the engine starts (thread binding), (b) records
when the actor's construction started and ended (to separate start-up from steady-state wall
time), (c) for the 25M model only, rewrites each request's `max_tokens`/`min_tokens` to its L, and
(d) for one diagnostic run on the default policy only, drops the per-sample seeds.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from prm_ray.cli import run_job
from prm_ray.config import ConfigError, param, to_dict

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POLICY = ROOT / "artifacts" / "policy"
RESERVED_CPUS = {
    # vLLM's own default on CPU: bind the model worker's OpenMP threads to all cores but one, which
    # is reserved for the engine-core (scheduler) process. On 2 cores: the model runs on 1 core.
    "auto": None,
    # EngineConfig.cpu_reserved_cpus=0 (the pipeline's default): the model worker uses every core.
    "all": 0,
}
QUICK = {"prompts": 8, "prompts_big": 4, "hf_batch": [64], "shard_size": 8, "mem_sizes": [100, 1000],
         "mem_shard_size": 100, "matmul_reps": 4}
"""What `--quick` sets (over any value given for these fields)."""


@dataclass
class RolloutBenchConfig:
    """Rollout throughput: the Ray/vLLM pipeline against plain transformers generate (docs/bench_rollout.md)."""

    quick: bool = param(False, "a few-minute smoke run: prompts 8, prompts_big 4, hf_batch 64, shard_size 8, "
                               "mem_sizes 100,1000, matmul_reps 4 (over any value given for them), and pipeline "
                               "runs default-shipped and 25m-bf16-<bind> unless runs is set")
    prompts: int = param(64, "validation prompts (both model sizes)")
    prompts_big: int = param(32, "validation prompts for the ~25M model (the first ones of prompts)")
    n: int = param(8, "samples per prompt")
    max_tokens: int = param(160, "max new tokens (the policy card's value)")
    hf_batch: list[int] = param(factory=lambda: [64, 128, 256],
                                help="generate batch sizes in sequences (each is measured, the best counts)")
    hf_dtypes: list[str] = param(factory=lambda: ["float32", "bfloat16"], help="generate dtypes")
    shard_size: int = param(32, "pipeline shard size (instructions)")
    max_num_seqs: int = param(256, "the pipeline engine's max_num_seqs (engine.max_num_seqs)")
    kvcache_gb: int = param(2, "VLLM_CPU_KVCACHE_SPACE per engine (engine.cpu_kvcache_gb)")
    bind: Literal["all", "auto"] = param("all", "vLLM thread binding for the main runs: all (every core) or auto "
                                                "(vLLM's default, one core reserved); the other one is run as a "
                                                "comparison")
    runs: list[str] | None = param(None, "pipeline run names, e.g. 25m-bf16-all,25m-bf16-all-seqs64; null: the "
                                         "default set (quick: default-shipped and 25m-bf16-<bind>)")
    keep: bool = param(False, "keep the temp dir (25M model, rollout outputs)")
    big: list[int] = param(factory=lambda: [512, 8, 8, 1376],
                           help="hidden, layers, heads, intermediate of the ~25M model")
    mem_sizes: list[int] = param(factory=lambda: [1000, 10000],
                                 help="driver-memory runs, in instructions ('' skips them)")
    mem_shard_size: int = param(100, "shard size of the driver-memory runs")
    mem_max_tokens: int = param(8, "max new tokens of the driver-memory runs")
    matmul_size: int = param(2048, "side of the square matmul of the peak measurement")
    matmul_reps: int = param(10, "repetitions of that matmul")
    out: str | None = param(None, "results JSON; null: bench/results/rollout_throughput[_quick].json")
    seed: int = param(0, "sampling and 25M-model init seed")
    mem_child: int | None = param(None, "internal: run one driver-memory measurement of this many "
                                        "instructions in this process", hidden=True)
    mem_out: str | None = param(None, "internal: the driver-memory run's rollout directory", hidden=True)

    def __post_init__(self) -> None:
        if len(self.big) != 4:
            raise ConfigError(f"big must be 4 integers (hidden, layers, heads, intermediate), got {self.big}")
        if not self.hf_batch or not self.hf_dtypes:
            raise ConfigError("hf_batch and hf_dtypes must not be empty")
        if self.prompts_big > self.prompts:
            raise ConfigError(f"prompts_big ({self.prompts_big}) must be <= prompts ({self.prompts})")


CONFIG, ALIASES = RolloutBenchConfig, {}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
    """1/5/15-min load averages and the CPU pressure (PSI 'some' avg10, % of time that some task
    waited for a CPU): on a shared 2-core machine, what else competed with this run."""
    out = [round(x, 2) for x in os.getloadavg()]
    try:
        some = open("/proc/pressure/cpu").readline().split()
        out.append(float(some[1].split("=")[1]))
    except (OSError, IndexError, ValueError):
        pass
    return out


def matmul_peak(size: int, reps: int) -> dict:
    """Best and median GFLOP/s of a square matmul, fp32 and bf16."""
    import torch

    from prm_ray.models import matmul_rates

    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        r = matmul_rates(size, dtype, reps=reps)
        out[name] = {"best_gflops": r["best"] / 1e9, "median_gflops": r["median"] / 1e9, "reps": reps, "size": size}
    return out


def build_25m(path: Path, hidden: int, layers: int, heads: int, inter: int, seed: int) -> int:
    import torch
    from transformers import LlamaForCausalLM

    from prm_ray.policy import ModelShape, build_char_tokenizer

    torch.manual_seed(seed)
    tok = build_char_tokenizer()
    shape = ModelShape(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=inter,
                       max_position_embeddings=256)
    model = LlamaForCausalLM(shape.to_config(vocab_size=len(tok)))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def length_stats(lengths: list[int], max_tokens: int) -> dict:
    s = sorted(lengths)
    return {"count": len(s), "mean": statistics.mean(s), "median": statistics.median(s),
            "p10": s[int(0.1 * (len(s) - 1))], "p90": s[int(0.9 * (len(s) - 1))], "min": s[0], "max": s[-1],
            "hit_max_tokens": sum(x >= max_tokens for x in s)}


# --------------------------------------------------------------------------------------------
# Plain transformers generate
# --------------------------------------------------------------------------------------------


def hf_generate(model_dir: Path, dtype: str, prompts: list[str], n: int, max_tokens: int, temperature: float,
                batch_seqs: int, forced: list[list[int]] | None, seed: int) -> dict:
    """Batched sampling with `generate` (left padding, num_return_sequences=n).

    `forced[i][j]`: exact length of sample j of prompt i (EOS suppressed, per-row stop at that
    length). Without it, sequences stop at their own EOS (counted) or at max_tokens.
    Returns per-(prompt, sample) lengths and the time spent inside `generate`.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaForCausalLM,
        LogitsProcessor,
        LogitsProcessorList,
        StoppingCriteria,
        StoppingCriteriaList,
    )

    from prm_ray.tokens import render_prompt

    class SuppressToken(LogitsProcessor):
        def __init__(self, token_id: int) -> None:
            self.token_id = token_id

        def __call__(self, input_ids, scores):
            scores[:, self.token_id] = -float("inf")
            return scores

    class RowLengths(StoppingCriteria):
        def __init__(self, lengths: torch.Tensor, width: int) -> None:
            self.lengths, self.width = lengths, width

        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids.shape[1] - self.width) >= self.lengths

    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    t0 = time.time()
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    load_s = time.time() - t0
    eos, pad = tok.eos_token_id, tok.pad_token_id
    texts = [render_prompt(tok, p) for p in prompts]
    common = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0, pad_token_id=pad,
                  eos_token_id=eos)
    with torch.inference_mode():
        enc = tok(texts[:1], add_special_tokens=False, return_tensors="pt")
        t0 = time.time()
        model.generate(**enc, max_new_tokens=4, **common)  # warm-up, not timed
        warmup_s = time.time() - t0
        torch.manual_seed(seed)
        per_batch = max(1, batch_seqs // n)
        lengths: list[list[int]] = []
        gen_s = cpu_s = 0.0
        for start in range(0, len(texts), per_batch):
            chunk = texts[start : start + per_batch]
            enc = tok(chunk, add_special_tokens=False, return_tensors="pt", padding=True)
            width = enc["input_ids"].shape[1]
            extra: dict = {"max_new_tokens": max_tokens}
            if forced is not None:
                rows = torch.tensor([forced[start + i][j] for i in range(len(chunk)) for j in range(n)])
                extra = {"max_new_tokens": int(rows.max()),
                         "logits_processor": LogitsProcessorList([SuppressToken(eos)]),
                         "stopping_criteria": StoppingCriteriaList([RowLengths(rows, width)])}
            t0, c0 = time.perf_counter(), time.process_time()
            seqs = model.generate(**enc, num_return_sequences=n, **common, **extra)
            gen_s += time.perf_counter() - t0
            cpu_s += time.process_time() - c0
            new = seqs[:, width:].tolist()
            for r, ids in enumerate(new):
                if forced is not None:
                    length = forced[start + r // n][r % n]
                    assert eos not in ids[:length]
                else:
                    length = ids.index(eos) + 1 if eos in ids else len(ids)
                if r % n == 0:
                    lengths.append([])
                lengths[-1].append(length)
    tokens = sum(map(sum, lengths))
    del model
    return {"engine": "generate", "dtype": dtype, "load_s": load_s, "warmup_s": warmup_s,
            "generate_s": gen_s, "cpu_s": cpu_s, "cores_used": cpu_s / gen_s, "tokens": tokens,
            "sequences": len(prompts) * n,
            "tok_s": tokens / gen_s, "batch_seqs": min(per_batch, len(prompts)) * n, "lengths": lengths}


# --------------------------------------------------------------------------------------------
# The real pipeline
# --------------------------------------------------------------------------------------------


def make_sampler(env: dict, side_file: str, lengths_file: str | None, strip_seeds: bool):
    """A `VLLMSampler` subclass; see the module docstring for what it changes (nothing on the
    default path but environment variables and a side file with construction timestamps)."""
    from prm_ray.stages.rollout import VLLMSampler

    class BenchSampler(VLLMSampler):
        def __init__(self, *args, **kwargs):
            t_start = time.time()
            os.environ.update(env)
            super().__init__(*args, **kwargs)
            lengths = None
            if lengths_file:
                with open(lengths_file) as f:
                    lengths = {int(k): v for k, v in json.load(f).items()}
            if lengths is not None or strip_seeds:
                real = self.llm.generate

                def generate(requests, params, **kw):
                    from vllm import SamplingParams

                    new = []
                    for p in params:
                        length = lengths[p.seed] if lengths is not None else p.max_tokens
                        new.append(SamplingParams(
                            n=1, temperature=p.temperature, top_p=p.top_p, max_tokens=length,
                            min_tokens=length if lengths is not None else 0,
                            seed=None if strip_seeds else p.seed, logprobs=p.logprobs))
                    return real(requests, new, **kw)

                self.llm.generate = generate
            with open(side_file, "w") as f:
                json.dump({"init_start": t_start, "init_end": time.time(), "llm_startup_s": self.startup_s,
                           "pid": os.getpid()}, f)

    return BenchSampler


@dataclass
class VllmRun:
    name: str
    model: str  # "default" | "25m"
    dtype: str
    bind: str
    shard_size: int
    max_num_seqs: int
    strip_seeds: bool = False
    note: str = ""
    eager: bool = True  # False: let vLLM compile the model (torch.compile) and capture graphs


def pipeline_run(spec: VllmRun, model_dir: Path, args: RolloutBenchConfig, temperature: float, work: Path,
                 lengths_file: Path | None) -> dict:
    import pyarrow.parquet as pq

    from prm_ray.stages.rollout import EngineConfig, RolloutConfig, SamplingConfig, run_rollouts

    out = work / f"rollouts-{spec.name}"
    side = work / f"side-{spec.name}.json"
    cfg = RolloutConfig(
        model=str(model_dir), out=str(out), task="arith", split="validation",
        limit=args.prompts if spec.model == "default" else args.prompts_big,
        shard_size=spec.shard_size,
        sampling=SamplingConfig(n=args.n, temperature=temperature, max_tokens=args.max_tokens, seed=0),
        engine=EngineConfig(dtype=spec.dtype, max_num_seqs=spec.max_num_seqs, cpu_kvcache_gb=args.kvcache_gb,
                            cpu_reserved_cpus=RESERVED_CPUS[spec.bind], enforce_eager=spec.eager),
        progress=False,
    )
    sampler = make_sampler({}, str(side),
                           str(lengths_file) if spec.model == "25m" else None, spec.strip_seeds)
    t0 = time.time()
    summary = run_rollouts(cfg, sampler_cls=sampler)
    t1 = time.time()
    sidedata = json.loads(side.read_text())
    r = summary["this_run"]
    table = pq.read_table(out / "data", columns=["num_tokens", "finish_reason"]).to_pydict()
    tokens = r["generated_tokens"]
    steady_s = t1 - sidedata["init_end"]
    return {
        "engine": "pipeline (vLLM)", **asdict(spec), "sequences": summary["responses"], "tokens": tokens,
        "tok_s": r["generated_tokens_per_s"],  # per second of engine busy time (llm.generate)
        "wall_tok_s_excl_startup": tokens / (r["wall_seconds"] - r["engine_startup_seconds"]),
        "wall_tok_s_after_ready": tokens / steady_s,
        "engine_startup_s": r["engine_startup_seconds"],
        "actor_init_s": sidedata["init_end"] - sidedata["init_start"],  # process: imports+tokenizer+LLM()
        "actor_scheduled_after_s": sidedata["init_start"] - t0,
        "wall_s": r["wall_seconds"], "driver_wall_s": t1 - t0, "generate_s": r["generate_seconds"],
        "verify_s": r["verify_seconds"], "steady_wall_s": steady_s,
        "shards": r["shards_done"], "finish_reason": {k: table["finish_reason"].count(k)
                                                       for k in set(table["finish_reason"])},
        "pass@1": summary["pass@1"], "temperature": summary["temperature"],
        "resolved_dtype": ",".join(r["engine_dtypes"]),
    }


# --------------------------------------------------------------------------------------------
# Driver memory (one subprocess per size)
# --------------------------------------------------------------------------------------------


def vm_hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def mem_child(args: RolloutBenchConfig) -> None:
    """Run the shipped pipeline on `mem_child` train instructions; print the driver's RSS."""
    import psutil

    proc = psutil.Process()
    peak = {"rss": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], proc.memory_info().rss)
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    import ray

    from prm_ray.stages.rollout import RolloutConfig, SamplingConfig, run_rollouts

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    before = proc.memory_info().rss
    hwm_before = vm_hwm_mb()
    cfg = RolloutConfig(model=str(DEFAULT_POLICY), out=args.mem_out, task="arith", split="train",
                        limit=args.mem_child, shard_size=args.mem_shard_size,
                        sampling=SamplingConfig(n=1, max_tokens=args.mem_max_tokens, seed=0), progress=False)
    t0 = time.time()
    summary = run_rollouts(cfg)
    wall = time.time() - t0
    stop.set()
    thread.join()
    print("MEMRESULT " + json.dumps({
        "instructions": args.mem_child, "responses": summary["responses"], "shards": summary["this_run"]["shards_done"],
        "rss_before_run_mb": before / 2**20, "rss_peak_sampled_mb": peak["rss"] / 2**20,
        # VmHWM: the kernel's exact peak RSS of this process image; unlike ru_maxrss it is not
        # inherited from the (large) parent's image across fork+exec.
        "vm_hwm_before_run_mb": hwm_before, "vm_hwm_mb": vm_hwm_mb(),
        "wall_s": wall, "engine_startup_s": summary["this_run"]["engine_startup_seconds"],
    }), flush=True)
    ray.shutdown()


def mem_parent(size: int, args: RolloutBenchConfig, work: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mem_child", str(size),
           "--mem_out", str(work / f"mem-{size}"), "--mem_shard_size", str(args.mem_shard_size),
           "--mem_max_tokens", str(args.mem_max_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMRESULT "):
            return json.loads(line[len("MEMRESULT "):])
    raise RuntimeError(f"memory child for {size} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def dtype_label(r: dict) -> str:
    if r["dtype"] == "auto" and r.get("resolved_dtype"):
        return f"auto ({r['resolved_dtype']})"
    return r["dtype"]


def markdown(res: dict) -> str:
    peak = res["matmul"]["bfloat16"]["best_gflops"]
    lines = [
        "| model | engine | dtype | settings | seqs | tokens | tok/s (busy) | wall tok/s excl. start-up "
        "| wall tok/s after ready | start-up s | vs best generate | GFLOP/s | % bf16 peak | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in ("default", "25m"):
        info = res["models"][size]
        rows = [r for r in res["runs"] if r["model"] == size]
        best_hf = max((r["tok_s"] for r in rows if r["engine"] == "generate"), default=None)
        for r in rows:
            gflops = 2 * info["params"] * r["tok_s"] / 1e9
            if r["engine"] == "generate":
                settings = f"batch {r['batch_seqs']} seqs"
                wall_ex, wall_ready, start = f"{r['tok_s']:,.0f}", f"{r['tok_s']:,.0f}", f"load {r['load_s']:.1f}"
            else:
                settings = (f"bind {r['bind']}, shard {r['shard_size']}, max_num_seqs {r['max_num_seqs']}"
                            + ("" if r.get("eager", True) else ", compiled")
                            + (", no per-sample seeds" if r["strip_seeds"] else ""))
                wall_ex = f"{r['wall_tok_s_excl_startup']:,.0f}"
                wall_ready = f"{r['wall_tok_s_after_ready']:,.0f}"
                start = f"{r['engine_startup_s']:.1f} (actor {r['actor_init_s']:.1f})"
            ratio = f"{r['tok_s'] / best_hf:.2f}x" if best_hf else "-"
            lines.append(
                f"| {info['label']} | {r['engine']} | {dtype_label(r)} | {settings} | {r['sequences']} | "
                f"{r['tokens']:,} | {r['tok_s']:,.0f} | {wall_ex} | {wall_ready} | {start} | {ratio} | "
                f"{gflops:.1f} | {100 * gflops / peak:.1f}% | {r['loadavg'][0][0]:.1f} |")
    lines.append("")
    mm = res["matmul"]
    lines.append(f"Matmul peak ({mm['float32']['size']}^2, best of {mm['float32']['reps']}): "
                 f"fp32 {mm['float32']['best_gflops']:.0f} GFLOP/s, bf16 {mm['bfloat16']['best_gflops']:.0f} GFLOP/s.")
    if res.get("memory"):
        lines += ["", "| driver, n=1 | instructions | shards | RSS before run MB | peak RSS MB (VmHWM) "
                  "| peak RSS MB (sampled) | wall s |", "|---|---|---|---|---|---|---|"]
        for m in res["memory"]:
            lines.append(f"| run_rollouts | {m['instructions']:,} | {m['shards']} | {m['rss_before_run_mb']:.0f} | "
                         f"{m['vm_hwm_mb']:.0f} | {m['rss_peak_sampled_mb']:.0f} | {m['wall_s']:.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def vllm_runs(args: RolloutBenchConfig) -> list[VllmRun]:
    b, other = args.bind, ("auto" if args.bind == "all" else "all")
    s, m = args.shard_size, args.max_num_seqs
    runs = [
        VllmRun("default-fp32-auto", "default", "float32", "auto", s, m, note="vLLM's own CPU defaults"),
        VllmRun("default-shipped", "default", "auto", "all", s, m,
                note="the pipeline's defaults: dtype auto (bf16 on this CPU), no reserved core"),
        VllmRun("default-fp32-auto-noseed", "default", "float32", "auto", s, m, strip_seeds=True,
                note="diagnostic: per-sample seeds dropped"),
        VllmRun(f"default-fp32-{b}", "default", "float32", b, s, m),
        VllmRun(f"25m-fp32-{b}", "25m", "float32", b, s, m),
        VllmRun(f"25m-bf16-{b}", "25m", "bfloat16", b, s, m),
        VllmRun(f"25m-bf16-{other}", "25m", "bfloat16", other, s, m),
        VllmRun(f"25m-bf16-{b}-seqs64", "25m", "bfloat16", b, s, 64, note="smaller running batch"),
        VllmRun(f"25m-bf16-{b}-compiled", "25m", "bfloat16", b, s, m, eager=False, note="enforce_eager=False"),
        VllmRun("default-shipped-compiled", "default", "auto", "all", s, m, eager=False, note="enforce_eager=False"),
    ]
    # The default list (what a full run measures); the others can be asked for with --runs.
    default_names = ["default-fp32-auto", "default-shipped", f"25m-fp32-{b}", f"25m-bf16-{b}",
                     f"25m-bf16-{other}"]
    if args.runs:
        wanted = args.runs
        missing = set(wanted) - {r.name for r in runs}
        if missing:
            raise ConfigError(f"runs: unknown {sorted(missing)}; valid: {', '.join(r.name for r in runs)}")
        runs = [r for r in runs if r.name in wanted]
    elif args.quick:
        runs = [r for r in runs if r.name in ("default-shipped", f"25m-bf16-{b}")]
    else:
        runs = [r for r in runs if r.name in default_names]
    seen, unique = set(), []
    for r in runs:
        if r.name not in seen:
            seen.add(r.name)
            unique.append(r)
    return unique


def run(args: RolloutBenchConfig) -> dict:
    if args.mem_child is not None:
        mem_child(args)
        return {}
    if args.quick:
        args = replace(args, **QUICK)
    vllm_runs(args)  # an unknown run name fails now, not after the generate runs
    t_start = time.time()
    out_path = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        "rollout_throughput_quick.json" if args.quick else "rollout_throughput.json")
    import torch
    import transformers
    import vllm  # noqa: F401  (version only; the engines run in Ray actors)

    from prm_ray.artifacts import read_policy_card
    from prm_ray.models import count_parameters
    from prm_ray.stages.rollout import sample_seed
    from prm_ray.tasks.arith import ArithConfig, ArithTask

    res: dict = {
        "command": " ".join([".venv/bin/python", "bench/rollout_throughput.py", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "gpu": False, "loadavg_start": loadavg()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "vllm": vllm.__version__, "python": platform.python_version()},
        "args": to_dict(args),
    }
    try:
        res["machine"]["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    torch.set_num_threads(os.cpu_count() or 1)
    log("matmul microbenchmark")
    res["matmul"] = matmul_peak(args.matmul_size, args.matmul_reps)
    log(json.dumps({k: round(v["best_gflops"]) for k, v in res["matmul"].items()}))

    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    big_dir = work / "llama-25m"
    hidden, layers, heads, inter = args.big
    big_params = build_25m(big_dir, hidden, layers, heads, inter, args.seed)
    temperature = float(read_policy_card(DEFAULT_POLICY)["rollout_temperature"])
    res["models"] = {
        "default": {"label": "default 1.35M", "path": str(DEFAULT_POLICY), "params": count_parameters(str(DEFAULT_POLICY)),
                    "shape": "hidden 192, 3 layers, 3 heads of 64, intermediate 512"},
        "25m": {"label": f"{big_params / 1e6:.1f}M random", "path": str(big_dir), "params": big_params,
                "shape": f"hidden {hidden}, {layers} layers, {heads} heads of {hidden // heads}, "
                         f"intermediate {inter}, vocab 100, tied embeddings"},
    }
    log(f"models: default {res['models']['default']['params']:,} params; 25M {big_params:,} params")
    insts = list(ArithTask(ArithConfig()).instructions("validation", limit=args.prompts))
    prompts = [i.prompt for i in insts]
    res["workload"] = {"task": "arith", "split": "validation", "prompts_default": len(prompts),
                       "prompts_25m": args.prompts_big, "n": args.n,
                       "temperature": temperature, "top_p": 1.0, "max_tokens": args.max_tokens}
    runs: list[dict] = []
    res["runs"] = runs

    def save() -> None:  # after every measurement, so a crash keeps what was measured
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=2))

    # 1. plain generate (before Ray starts, so nothing else of ours competes for the 2 cores)
    lengths = None
    batches = args.hf_batch
    for dtype in args.hf_dtypes:
        for batch in batches:
            log(f"generate default {dtype} batch {batch}")
            la = loadavg()
            r = hf_generate(DEFAULT_POLICY, dtype, prompts, args.n, args.max_tokens, temperature, batch,
                            None, args.seed)
            if lengths is None:
                lengths = r["lengths"]
                res["length_distribution"] = {"source": f"default policy, generate {dtype} batch {batch}",
                                              **length_stats([x for row in lengths for x in row], args.max_tokens)}
            runs.append({"model": "default", **{k: v for k, v in r.items() if k != "lengths"},
                         "loadavg": [la, loadavg()]})
            log(f"  {r['tokens']:,} tokens in {r['generate_s']:.1f}s = {r['tok_s']:,.0f} tok/s "
                f"({r['cores_used']:.2f} cores busy; load {runs[-1]['loadavg']})")
            save()
    for dtype in args.hf_dtypes:
        for batch in batches:
            log(f"generate 25M {dtype} batch {batch}")
            la = loadavg()
            r = hf_generate(big_dir, dtype, prompts[: args.prompts_big], args.n, args.max_tokens, temperature,
                            batch, lengths[: args.prompts_big], args.seed)
            runs.append({"model": "25m", **{k: v for k, v in r.items() if k != "lengths"},
                         "loadavg": [la, loadavg()]})
            log(f"  {r['tokens']:,} tokens in {r['generate_s']:.1f}s = {r['tok_s']:,.0f} tok/s "
                f"({r['cores_used']:.2f} cores busy; load {runs[-1]['loadavg']})")
            save()
    lengths_file = work / "lengths_by_seed.json"
    lengths_file.write_text(json.dumps({
        str(sample_seed(args.seed, inst.id, j)): lengths[i][j]
        for i, inst in enumerate(insts[: args.prompts_big]) for j in range(args.n)
    }))
    res["length_distribution_25m"] = length_stats([x for row in lengths[: args.prompts_big] for x in row],
                                                  args.max_tokens)

    # 2. the pipeline
    import ray

    t0 = time.time()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    res["ray_init_s"] = time.time() - t0
    for spec in vllm_runs(args):
        log(f"pipeline {spec.name}")
        model_dir = DEFAULT_POLICY if spec.model == "default" else big_dir
        la = loadavg()
        try:
            r = pipeline_run(spec, model_dir, args, temperature, work, lengths_file)
        except Exception as exc:  # record and go on: one failing setting must not lose the rest
            log(f"  FAILED: {exc!r}")
            res.setdefault("failures", []).append({"run": spec.name, "error": repr(exc)[:2000]})
            continue
        r["loadavg"] = [la, loadavg()]
        runs.append(r)
        log(f"  {r['tokens']:,} tokens; busy {r['tok_s']:,.0f} tok/s; wall excl. start-up "
            f"{r['wall_tok_s_excl_startup']:,.0f}; after ready {r['wall_tok_s_after_ready']:,.0f}; "
            f"engine start-up {r['engine_startup_s']:.1f}s (actor init {r['actor_init_s']:.1f}s); "
            f"finish {r['finish_reason']}; load {r['loadavg']}")
        save()
        time.sleep(2)  # let the engine processes exit before the next measurement
    ray.shutdown()

    # 3. driver memory, one fresh process (and Ray) per size
    res["memory"] = []
    for size in args.mem_sizes:
        log(f"driver memory, {size} instructions")
        try:
            m = mem_parent(size, args, work)
        except Exception as exc:
            log(f"  FAILED: {exc!r}")
            res.setdefault("failures", []).append({"run": f"memory-{size}", "error": repr(exc)[:4000]})
            continue
        res["memory"].append(m)
        save()
        log(f"  RSS before {m['rss_before_run_mb']:.0f} MB, peak {m['vm_hwm_mb']:.0f} MB (VmHWM; sampled "
            f"{m['rss_peak_sampled_mb']:.0f}), {m['wall_s']:.1f}s")

    res["machine"]["loadavg_end"] = loadavg()
    res["total_s"] = time.time() - t_start
    if args.keep:
        res["work_dir"] = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    save()
    table = markdown(res)
    print()
    print(table)
    print(f"\nlength distribution (default policy): {res['length_distribution']}")
    print(f"25M forced lengths: {res['length_distribution_25m']}")
    print(f"total {res['total_s']:.0f}s; results in {out_path}")
    return res


def main(argv=None) -> dict:
    return run_job(run, CONFIG, argv, aliases=ALIASES, description=__doc__)


if __name__ == "__main__":
    main()
