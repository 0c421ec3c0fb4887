"""Precision `auto` on two kinds of CPU: what bf16 and fp32 cost per stage, and what `auto` picks.

    python bench/precision_bench.py            # this CPU as it is, and the same CPU as an AVX2-only one (~3 min)
    python bench/precision_bench.py --quick    # a smoke run (tests run it)

Each CPU mode runs in its own process, one torch thread, the shipped policy (1.35M) and the
project's own code for each stage's work:
- **training**: `stages.train.step.micro_batch_loss` (CE, 16 rows of arith solutions) + backward +
  AdamW, fp32 weights, with and without bf16 autocast (`train.precision` bfloat16 / float32);
- **reference pass / evaluation**: `stages.logprobs.ModelPass` (`token_logp`, 64 rows, micro-batch
  32) with the model in bfloat16 and in float32 (`ref_pass.dtype`, `eval.dtype`, serving's `dtype`);
- the 1024^2 matmul rate in each dtype.

The AVX2-only CPU is this CPU with oneDNN capped at AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`) and ATen's
kernels at AVX2 (`ATEN_CPU_CAPABILITY=avx2`): bf16 matmuls are then emulated, as on a CPU without
AVX512-BF16 or AMX. `prm_ray.resources.cpu_has_native_bf16` honours the oneDNN cap, so `auto`
resolves there as it would on such a CPU. Absolute speeds of a real AVX2 CPU differ; the point is
the ratio, and which dtype `auto` picks. Writes `out` (JSON) and prints a markdown table
(docs/bench_precision.md).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prm_ray.cli import run_job  # noqa: E402
from prm_ray.config import ConfigError, param  # noqa: E402

MODES = {
    "native": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}


@dataclass
class PrecisionBenchConfig:
    """bf16 against fp32 for each stage's work, on this CPU and on it capped to AVX2 (docs/bench_precision.md)."""

    quick: bool = param(False, "a smoke run: 1 timed repetition and small batches")
    modes: list[str] = param(factory=lambda: list(MODES), help="native (this CPU) and/or avx2 (capped to AVX2)")
    reps: int = param(5, "timed repetitions per measurement (the median counts), after one warm-up")
    policy: str = param(str(ROOT / "artifacts" / "policy"), "the model")
    out: str = param(str(ROOT / "bench" / "results" / "precision.json"), "results JSON")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.modes) - set(MODES))
        if unknown or not self.modes:
            raise ConfigError(f"modes: unknown {unknown}; choose from {', '.join(MODES)}" if unknown
                              else f"modes must name at least one of {', '.join(MODES)}")
        if self.reps < 1:
            raise ConfigError(f"reps must be >= 1, got {self.reps}")


CONFIG, ALIASES = PrecisionBenchConfig, {}


def _median_s(fn, reps: int) -> float:
    fn()  # warm-up: oneDNN primitive creation, allocator
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _train_step(ctx, opt, batch: dict, out: dict) -> None:
    from prm_ray.stages.train.step import micro_batch_loss

    loss, stats = micro_batch_loss(ctx, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    out["train_tokens"] = stats["tokens"]


def measure(policy: str, reps: int, quick: bool) -> dict:
    """One CPU mode, in this process (its environment decides the mode)."""
    import pyarrow as pa
    import torch

    from prm_ray.models import load_causal_lm, load_tokenizer, matmul_rates
    from prm_ray.resources import Resources, cpu_has_native_bf16, resolve_dtype
    from prm_ray.stages.logprobs import ModelPass
    from prm_ray.stages.train import TrainConfig
    from prm_ray.stages.train.examples import tokenize_examples
    from prm_ray.stages.train.step import StepContext
    from prm_ray.tasks.arith import ArithTask
    from prm_ray.tokens import pad_token_id

    torch.set_num_threads(1)
    micro, rows_n = (4, 8) if quick else (16, 64)
    insts = list(ArithTask().instructions("train", limit=rows_n))
    rows = {"prompt": [i.prompt for i in insts], "response": [i.meta["solution"] for i in insts]}
    tok = load_tokenizer(policy)
    cfg = TrainConfig(micro_batch_size=micro, global_batch_size=micro, workers=Resources(replicas=1), loggers=[])
    batch = tokenize_examples(pa.table({"prompt": rows["prompt"][:micro], "response": rows["response"][:micro],
                                        "ref_logp": [0.0] * micro, "label": [j % 2 for j in range(micro)]}), tok)
    out: dict = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
                 "native_bf16": cpu_has_native_bf16(), "auto": resolve_dtype("auto", 0),
                 "matmul_gflops": {}, "train_step_s": {}, "reference_pass_s": {}}
    table = pa.table(rows)
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out["matmul_gflops"][name] = matmul_rates(256 if quick else 1024, dt, reps=reps)["median"] / 1e9
        model = load_causal_lm(policy, torch.float32).train()
        model.config.use_cache = False
        ctx = StepContext(model, cfg, pad_token_id(tok), torch.device("cpu"), autocast=name == "bfloat16")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        out["train_step_s"][name] = _median_s(partial(_train_step, ctx, opt, batch, out), reps)
        ref = ModelPass(policy, "token_logp", dtype=name, micro_batch_size=32, threads=1)
        with torch.no_grad():
            out["reference_pass_s"][name] = _median_s(partial(ref, table), reps)
    out["rows"] = {"train_micro_batch": micro, "reference_pass_rows": rows_n}
    return out


def run(cfg: PrecisionBenchConfig) -> dict:
    import torch

    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
               platform.machine(), "cpu": _cpu_name(), "torch": torch.__version__, "config": vars(cfg), "modes": {}}
    for mode in cfg.modes:
        env = {**os.environ, **MODES[mode]}
        proc = subprocess.run([sys.executable, __file__, "--child", cfg.policy, str(cfg.reps), str(int(cfg.quick))],
                              env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"mode {mode} failed:\n{proc.stderr[-3000:]}")
        results["modes"][mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(results, indent=2))
    print(f"\n{results['cpu']}, torch {results['torch']}, 1 thread, {results['date']}\n")
    print("| CPU | work | fp32 s | bf16 s | bf16 / fp32 | `auto` picks | `auto` / best |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results["modes"].items():
        label = "this CPU" if mode == "native" else "capped to AVX2"
        for work, key in (("training step", "train_step_s"), ("reference pass", "reference_pass_s")):
            t = r[key]
            best = min(t.values())
            print(f"| {label} ({r['cpu_capability']}) | {work} | {t['float32']:.3f} | {t['bfloat16']:.3f} | "
                  f"{t['bfloat16'] / t['float32']:.2f}x | {r['auto']} | {t[r['auto']] / best:.2f} |")
    print("\nMatmul GFLOP/s (1 thread): " + "; ".join(
        f"{mode}: fp32 {r['matmul_gflops']['float32']:.1f}, bf16 {r['matmul_gflops']['bfloat16']:.1f}"
        for mode, r in results["modes"].items()))
    return results


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> dict:
    return run_job(run, CONFIG, argv, aliases=ALIASES, description=__doc__)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), bool(int(sys.argv[4])))))
    else:
        main()
