"""Training step and scoring on one device: prm-ray's code against plain PyTorch, in one run.

    python bench/gpu_bench.py                                  # 60m, 370m and 1.4b on the GPU
    python bench/gpu_bench.py --shapes 1.4b --micro_batch_size 32
    python bench/gpu_bench.py --quick                          # a tiny model on CPU, seconds (tests run it)

torch and transformers only: no Ray and no vLLM, which a bare GPU node without network cannot
install. Random-init Llama shapes with a 32k vocabulary; rows of arith-style steps whose lengths
are drawn uniformly from [min_len, seq_len] tokens (the character tokenizer: one token per
character), so padding is that of real, variable-length responses. Per shape:

- **training**: prm-ray's micro-batch (`stages.train.step.micro_batch_loss`, CE: it pads the
  rows' token columns, tokenized once beforehand as training does, to the longest, and takes the
  log-probs through the chunked LM head) plus backward and AdamW, wrapped as a training worker
  wraps it (`stages.train.parallel`), in each of `variants`: `ddp` (fp32 weights, bf16 autocast),
  `fsdp` (FSDP2 over a one-process group: bf16 compute over fp32 master weights),
  `fsdp+compile` (and `torch.compile` per block). Against a plain step on the same rows padded
  once (fp32 weights and bf16 autocast, the same loss and optimizer; the LM head and a fused
  `cross_entropy` on response positions only). Tokens/s and MFU =
  6 x params x tokens/s over the device's dense bf16 peak.
- **scoring**: `ImplicitPRM.score` (policy and reference, `score_batch_size` responses per
  batch, bf16 weights on a GPU) against a plain forward of both models on the same batches
  pre-tokenized. Responses/s and TFLOP/s (2 x params x tokens for each of the two models).
- **the same numbers**: the first micro-batch's loss and the first batch's token rewards by both
  paths (fp32 in `--quick`: they agree to 1e-5).

Writes `out` (JSON) and prints a markdown table; docs/bench_gpu.md says how to read it.
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from transformers import LlamaForCausalLM

from prm_ray.cli import run_job
from prm_ray.config import ConfigError, param
from prm_ray.core.losses import ce_loss
from prm_ray.core.reward import ResponseLogprobs
from prm_ray.models import matmul_rates
from prm_ray.policy import ModelShape, build_char_tokenizer
from prm_ray.resources import Resources
from prm_ray.scoring import ImplicitPRM
from prm_ray.stages.train import TrainConfig
from prm_ray.stages.train.examples import tokenize_examples
from prm_ray.stages.train.parallel import parallelize
from prm_ray.stages.train.step import StepContext, micro_batch_loss
from prm_ray.tokens import collate_items, collate_tokens, pad_token_id

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # Llama shapes; parameters with a 32k vocabulary and untied embeddings
    "tiny": ModelShape(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_position_embeddings=1024),
    "60m": ModelShape(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376, max_position_embeddings=1024),
    "370m": ModelShape(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=2816,
                       max_position_embeddings=1024),
    "1.4b": ModelShape(hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=5632,
                       max_position_embeddings=1024),
}
# Dense bf16 peak of known accelerators, TFLOP/s (the vendors' datasheets, without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
VARIANTS = ("ddp", "fsdp", "fsdp+compile")  # how prm-ray's training step is wrapped (train.strategy, train.compile)


@dataclass
class GpuBenchConfig:
    """prm-ray's training step and scoring against plain PyTorch on one device (docs/bench_gpu.md)."""

    quick: bool = param(False, "a smoke run: the tiny shape in float32 on CPU, 3 steps (the test suite runs it)")
    shapes: list[str] = param(factory=lambda: ["60m", "370m", "1.4b"], help="model shapes: tiny, 60m, 370m, 1.4b")
    device: str = param("auto", "auto: cuda when available, else cpu")
    vocab_size: int = param(32000, "the models' vocabulary (the LM head's width)")
    seq_len: int = param(520, "the longest row, prompt and response, in tokens")
    min_len: int = param(130, "the shortest row in tokens; lengths are uniform in [min_len, seq_len]")
    micro_batch_size: int = param(16, "rows per training micro-batch")
    variants: list[str] = param(factory=lambda: list(VARIANTS),
                                help="prm-ray training steps to time: ddp (fp32 weights, bf16 autocast), fsdp "
                                     "(FSDP2, bf16 compute over fp32 master weights), fsdp+compile")
    logprob_chunk: int = param(1024, "train.logprob_chunk: response positions per LM-head chunk (0: full logits)")
    score_batch_size: int = param(128, "responses per scoring batch")
    steps: int = param(10, "measured training steps and scoring batches per path")
    warmup: int = param(3, "unmeasured steps and batches first")
    peak_tflops: float | None = param(None, "the device's dense bf16 peak for MFU; null: known GPUs by name")
    seed: int = param(0, "rows and weights")
    out: str = param(str(ROOT / "bench" / "results" / "gpu_bench.json"), "results JSON")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.shapes) - set(SHAPES))
        if unknown or not self.shapes:
            raise ConfigError(f"shapes: unknown {unknown}; choose from {', '.join(SHAPES)}" if unknown
                              else f"shapes must name at least one of {', '.join(SHAPES)}")
        if not 8 <= self.min_len <= self.seq_len:
            raise ConfigError(f"min_len must be in [8, seq_len={self.seq_len}], got {self.min_len}")
        bad = sorted(set(self.variants) - set(VARIANTS))
        if bad or not self.variants:
            raise ConfigError(f"variants: unknown {bad}; choose from {', '.join(VARIANTS)}" if bad
                              else f"variants must name at least one of {', '.join(VARIANTS)}")
        if self.seq_len > 1000:
            raise ConfigError(f"seq_len must be at most 1000 (the shapes' context is 1024), got {self.seq_len}")
        if self.quick:
            self.shapes, self.device, self.steps, self.warmup = ["tiny"], "cpu", 3, 1
            self.variants = [v for v in self.variants if "compile" not in v]  # compiling takes longer than the run
            self.seq_len, self.min_len, self.micro_batch_size, self.score_batch_size = 96, 24, 4, 8


CONFIG, ALIASES = GpuBenchConfig, {}


def make_rows(n: int, cfg: GpuBenchConfig, rng: random.Random) -> list[dict]:
    """Prompt/response rows of arith-style steps, total lengths uniform in [min_len, seq_len]."""
    rows = []
    for i in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        prompt = f"Compute {a}+{b}*3-1 mod 10."
        target = rng.randint(cfg.min_len, cfg.seq_len) - len(prompt) - 16  # room for the template and EOS
        steps, value = [], a
        while sum(len(s) + 2 for s in steps) < target:
            d = rng.randrange(10)
            steps.append(f"Step {len(steps) + 1}: {value}+{d} = {(value + d) % 10}")
            value = (value + d) % 10
        response = "\n\n".join(steps)[: max(1, target)]
        rows.append({"prompt": prompt, "response": response, "label": i % 2, "ref_logp": -float(len(response))})
    return rows


def plain_logprob_sums(model, batch: dict[str, torch.Tensor], autocast: bool) -> torch.Tensor:
    """Sum of response-token log-probs per row, written plainly: the LM head and a fused
    cross-entropy on the response positions only."""
    mask = batch["response_mask"][:, 1:].bool()  # token i+1 is read from position i
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = model.lm_head(hidden[:, :-1][mask])
    nll = F.cross_entropy(logits.float(), batch["input_ids"][:, 1:][mask], reduction="none")
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    return -torch.zeros(mask.shape[0], device=nll.device, dtype=nll.dtype).index_add(0, rows, nll)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n_warmup: int, n: int, device: torch.device) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn(i)`` after ``n_warmup`` unmeasured ones."""
    for i in range(n_warmup):
        fn(i)
    out = []
    for i in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn(n_warmup + i)
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _train_path(path: str, model, tok, batches: list[dict], cfg: GpuBenchConfig, device: torch.device,
                gpu: bool) -> tuple[dict, float]:
    """Time one path's training steps (``plain`` or one of :data:`VARIANTS`); returns its rates
    and its first micro-batch's loss."""
    tcfg = TrainConfig(micro_batch_size=cfg.micro_batch_size, global_batch_size=cfg.micro_batch_size, beta=0.05,
                       workers=Resources(replicas=1), loggers=[], logprob_chunk=cfg.logprob_chunk)
    strategy, _, extra = path.partition("+")
    if path != "plain":  # as a training worker wraps it; bf16 by autocast (ddp) or FSDP2's casts (fsdp)
        model = parallelize(ResponseLogprobs(model, cfg.logprob_chunk), strategy, device, bf16=gpu,
                            compile=extra == "compile")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu)
    ctx = StepContext(model, tcfg, pad_token_id(tok), device, autocast=gpu and strategy == "ddp")
    pre = []
    if path == "plain":  # padded once, outside the clock
        for b in batches:
            t = collate_tokens(b, pad_token_id(tok), prefix="response_")
            pre.append({k: v.to(device) for k, v in t.items()} | {
                "ref": torch.tensor(b.column("ref_logp").to_pylist(), device=device),
                "label": torch.tensor(b.column("label").to_pylist(), device=device)})
    tokens: list[int] = []
    first: list[float] = []

    def step(i: int) -> None:
        if path != "plain":
            loss, stats = micro_batch_loss(ctx, batches[i])
            tokens.append(stats["tokens"])
        else:
            b = pre[i]
            loss = ce_loss(0.05 * (plain_logprob_sums(model, b, gpu) - b["ref"]), b["label"].float())
            tokens.append(int(b["attention_mask"].sum()))
        if i == 0:
            first.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    secs = timed(step, cfg.warmup, cfg.steps, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None  # weights, AdamW state, activations
    return {"tokens_per_s": sum(tokens[cfg.warmup:]) / sum(secs), "step_s_median": statistics.median(secs),
            "peak_memory_gib": peak}, first[0]


def bench_training(model_fn, tok, rows: list[dict], cfg: GpuBenchConfig, device: torch.device, gpu: bool) -> dict:
    mb = cfg.micro_batch_size
    # Tokenized once, outside the clock, as training reads a dataset's cached token columns.
    table = tokenize_examples(pa.Table.from_pylist(rows[: (cfg.warmup + cfg.steps) * mb]), tok)
    batches = [table.slice(i * mb, mb) for i in range(cfg.warmup + cfg.steps)]
    results: dict = {"first_loss": {}}
    for path in [*cfg.variants, "plain"]:
        torch.manual_seed(cfg.seed)  # the same initial weights for every path
        results[path], results["first_loss"][path] = _train_path(path, model_fn().train(), tok, batches, cfg,
                                                                  device, gpu)
        if gpu:
            torch.cuda.empty_cache()
    return results


def bench_scoring(model_fn, tok, rows: list[dict], cfg: GpuBenchConfig, device: torch.device,
                  dtype: torch.dtype) -> dict:
    torch.manual_seed(cfg.seed)
    policy = model_fn().to(dtype=dtype).eval()
    torch.manual_seed(cfg.seed + 1)
    ref = model_fn().to(dtype=dtype).eval()
    prm = ImplicitPRM(policy, tok, ref, beta=0.05)
    bs = cfg.score_batch_size
    groups = [rows[i * bs:(i + 1) * bs] for i in range(cfg.warmup + cfg.steps)]
    pre = [{k: v.to(device) for k, v in collate_items([prm.encode(r["prompt"], r["response"]) for r in g],
                                                          prm.pad_id).items()} for g in groups]
    out, tokens, first = {}, {"project": [], "plain": []}, {}

    def project(i: int) -> None:
        got = prm.score([r["prompt"] for r in groups[i]], [r["response"] for r in groups[i]], batch_size=bs)
        tokens["project"].append(int(pre[i]["attention_mask"].sum()))  # the same rows, the same tokens
        if i == 0:
            first["project"] = [s.q_values[-1] for s in got]

    @torch.inference_mode()
    def plain(i: int) -> None:
        r = 0.05 * (plain_logprob_sums(policy, pre[i], False) - plain_logprob_sums(ref, pre[i], False))
        tokens["plain"].append(int(pre[i]["attention_mask"].sum()))
        if i == 0:
            first["plain"] = r.tolist()

    for name, fn in (("project", project), ("plain", plain)):
        secs = timed(fn, cfg.warmup, cfg.steps, device)
        n_tok = sum(tokens[name][cfg.warmup:])
        out[name] = {"responses_per_s": bs * cfg.steps / sum(secs), "tokens_per_s": n_tok / sum(secs)}
    out["outcome_reward_max_abs_diff"] = max(abs(a - b) for a, b in zip(first["project"], first["plain"]))
    return out


def build_model(shape: ModelShape, vocab_size: int, device: torch.device | str) -> LlamaForCausalLM:
    """A random-init Llama, initialized where it runs (a 1.4B model's CPU init takes a while)."""
    config = shape.to_config(vocab_size=vocab_size)
    config.use_cache, config.tie_word_embeddings = False, False  # untied, as the named sizes count
    with torch.device(device):
        return LlamaForCausalLM(config)


def peak_for(device: torch.device, cfg: GpuBenchConfig) -> float | None:
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def run(cfg: GpuBenchConfig) -> dict:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    gpu = device.type == "cuda"
    # On a GPU: bf16 compute for training (prm-ray's train.precision bfloat16) and bf16 weights for scoring
    # (the study's eval dtype). --quick: float32 throughout, so every path must agree.
    score_dtype = torch.bfloat16 if gpu else torch.float32
    group = any(v.startswith("fsdp") for v in cfg.variants) and not dist.is_initialized()
    if group:  # FSDP2 shards over a process group: here one process
        dist.init_process_group("nccl" if gpu else "gloo", rank=0, world_size=1,
                                init_method=f"file://{tempfile.mkdtemp()}/pg")
    try:
        return _run(cfg, device, gpu, score_dtype)
    finally:
        if group:
            dist.destroy_process_group()


def _run(cfg: GpuBenchConfig, device: torch.device, gpu: bool, score_dtype: torch.dtype) -> dict:
    tok = build_char_tokenizer(model_max_length=1024)
    rng = random.Random(cfg.seed)
    train_rows = make_rows(cfg.micro_batch_size * (cfg.warmup + cfg.steps), cfg, rng)
    score_rows = make_rows(cfg.score_batch_size * (cfg.warmup + cfg.steps), cfg, rng)
    peak = peak_for(device, cfg)
    results = {"device": torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine(),
               "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "transformers": transformers.__version__,
               "config": asdict(cfg), "peak_flops": peak,
               "matmul_flops_bf16": matmul_rates(8192 if gpu else 1024, torch.bfloat16, device=device)["median"], "shapes": {}}
    for name in cfg.shapes:
        model_fn = partial(build_model, SHAPES[name], cfg.vocab_size, device)
        params = sum(p.numel() for p in build_model(SHAPES[name], cfg.vocab_size, "meta").parameters())
        print(f"== {name}: {params / 1e6:.1f}M params on {device}", flush=True)
        train = bench_training(model_fn, tok, train_rows, cfg, device, gpu)
        score = bench_scoring(model_fn, tok, score_rows, cfg, device, score_dtype)
        for path in [*cfg.variants, "plain"]:
            t = train[path]
            t["flops_per_s"] = 6 * params * t["tokens_per_s"]
            t["mfu"] = t["flops_per_s"] / peak if peak else None
        for path in ("project", "plain"):
            score[path]["flops_per_s"] = 2 * 2 * params * score[path]["tokens_per_s"]
        results["shapes"][name] = {"params": params, "train": train, "score": score}
        if gpu:
            torch.cuda.empty_cache()
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(results, indent=2))
    print(f"\n{results['device']}, torch {torch.__version__}; bf16 matmul "
          f"{results['matmul_flops_bf16'] / 1e12:.1f} TFLOP/s\n")
    paths = [*cfg.variants, "plain"]
    print("| shape | params | " + " | ".join(f"train tok/s (MFU, peak memory): {p}" for p in paths)
          + " | score TFLOP/s: prm-ray | plain | score responses/s: prm-ray | plain |")
    print("|---|---|" + "---|" * (len(paths) + 4))
    for name, r in results["shapes"].items():
        t, s = r["train"], r["score"]
        train = [f"{t[p]['tokens_per_s']:.0f}" + (f" ({t[p]['mfu']:.1%})" if t[p]["mfu"] is not None else "")
                 + (f", {t[p]['peak_memory_gib']:.1f} GiB" if t[p]["peak_memory_gib"] is not None else "")
                 for p in paths]
        print(f"| {name} | {r['params'] / 1e6:.0f}M | " + " | ".join(train)
              + f" | {s['project']['flops_per_s'] / 1e12:.2f} | {s['plain']['flops_per_s'] / 1e12:.2f} "
              f"| {s['project']['responses_per_s']:.1f} | {s['plain']['responses_per_s']:.1f} |")
    return results


def main(argv=None) -> dict:
    return run_job(run, CONFIG, argv, aliases=ALIASES, description=__doc__)


if __name__ == "__main__":
    main()
