"""A stand-in for a real instruct model, built here: the real-model path's dress rehearsal.

What distinguishes Llama-3.1-8B-Instruct from the embedded character-level policy, on a model small
enough for CPUs and the test suite:

* a byte-level BPE tokenizer trained with `tokenizers` on the MATH-500 problems and solutions (a few
  thousand merges), so tokens span characters, steps and separators as real ones do;
* a Llama-3-style chat template: ``<|begin_of_text|>``, ``<|start_header_id|>user<|end_header_id|>``,
  a distinct end-of-turn token ``<|eot_id|>`` (the EOS) and a generation prompt that opens the
  assistant turn, whose tokens must never earn a reward;
* an ordinary Hugging Face directory (``from_pretrained``, vLLM's loader).

A random model would only babble, so the stand-in is fitted for a few seconds to answer a handful
of MATH-500 problems in two ``Step N:`` steps, with the gold answer (also spelled as a decimal) or
a wrong one: sampling it gives right, wrong and equivalently-spelled answers, the mix every later
stage needs (both labels for CE and DPO, completions that differ for Math-Shepherd, answer groups).
It checks wiring, not quality. ``python scripts/build_standin.py --out DIR`` builds one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prm_ray.config import param, to_dict
from prm_ray.policy.model import ModelShape
from prm_ray.tasks.math import DEFAULT_PROMPT_SUFFIX, SHIPPED_DATA
from prm_ray.tokens import collate_items, encode_pair

BOS, EOT, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = (BOS, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", EOT, PAD)
# Llama 3's template without its default system turn: one header per message, the content
# stripped, <|eot_id|> after each, and the assistant header as the generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GENERATION_PROMPT = "<|start_header_id|>assistant<|end_header_id|>\n\n"
# Llama 3's pre-tokenizer split (tiktoken's cl100k pattern): words, 1-3 digit numbers, punctuation
# runs, newlines; byte-level BPE merges within those pieces.
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class StandinConfig:
    """How the stand-in is built (defaults: a few seconds on 2 CPU cores)."""

    merges: int = param(3000, "BPE merges learned on the MATH-500 text (the vocabulary is 256 bytes + these + "
                              "the special tokens)")
    problems: int = param(6, "MATH-500 problems it is fitted on: the first ones with short answers")
    steps: int = param(120, "optimizer steps of the fit")
    lr: float = param(1e-2, "AdamW learning rate of the fit")
    seed: int = param(0, "seed of the weights and the fit")
    shape: ModelShape = param(factory=lambda: ModelShape(hidden_size=64, num_layers=2, num_heads=2,
                                                         intermediate_size=128, max_position_embeddings=512),
                              help="")


def math500_rows() -> list[dict]:
    return [json.loads(line) for line in SHIPPED_DATA.read_text().splitlines() if line.strip()]


def train_bpe_tokenizer(texts: list[str], merges: int, context: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Llama 3's special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + len(SPECIAL_TOKENS) + merges, min_frequency=2,
                                  special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD,
                                 clean_up_tokenization_spaces=False, model_max_length=context)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def fit_problems(n: int) -> list[dict]:
    """The first ``n`` MATH-500 problems with a short answer, each with the responses it is fitted on."""
    chosen = []
    for row in math500_rows():
        gold = row["answer"]
        if len(gold) > 6 or "\\" in gold or len(row["problem"]) > 150:
            continue
        integer = re.fullmatch(r"-?\d+", gold) is not None
        wrong = str(int(gold) + 1) if integer else "0"
        answers = [gold, gold] + ([f"{gold}.0"] if integer else []) + [wrong]  # ~2/4 gold, 1/4 a decimal
        responses = [f"Step 1: Read the problem.\n\nStep 2: The answer is \\boxed{{{a}}}." for a in answers]
        chosen.append({"problem": row["problem"], "answer": gold, "unique_id": row.get("unique_id"),
                       "responses": responses})
        if len(chosen) == n:
            break
    return chosen


def build_standin(out: str | Path, cfg: StandinConfig | None = None) -> dict:
    """Build, fit and save the stand-in in ``out``; returns what it was fitted on (also in
    ``standin.json``: the problems, as a MATH-style JSONL a rollout can read)."""
    cfg = cfg or StandinConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = math500_rows()
    tok = train_bpe_tokenizer([r["problem"] for r in rows] + [r.get("solution", "") for r in rows],
                              cfg.merges, cfg.shape.max_position_embeddings)
    torch.manual_seed(cfg.seed)
    config = cfg.shape.to_config(vocab_size=len(tok))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model = LlamaForCausalLM(config)
    problems = fit_problems(cfg.problems)
    items = [encode_pair(tok, p["problem"] + DEFAULT_PROMPT_SUFFIX, r) for p in problems for r in p["responses"]]
    batch = collate_items(items, tok.pad_token_id)
    labels = batch["input_ids"].masked_fill(~batch["response_mask"], -100)  # the response and its EOT only
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model.train()
    for _ in range(cfg.steps):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out)
    info = {"vocab_size": len(tok), "fit_loss": loss.item(), "problems": problems, "config": to_dict(cfg)}
    (out / "standin.json").write_text(json.dumps(info, indent=1))
    with open(out / "problems.jsonl", "w") as f:
        for p in problems:
            f.write(json.dumps({k: p[k] for k in ("problem", "answer", "unique_id")}) + "\n")
    return info
