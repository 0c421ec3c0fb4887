"""The public scoring API: step scores of a response from a trained PRM, implicit or explicit.

Example::

    prm = ImplicitPRM.from_pretrained("path/to/prm", ref_path="path/to/ref", beta=0.05)
    [s.score for s in prm.score(["What is 1+1?"], ["1+1 = 2.\\n\\nThe answer is 2."])]

Per response: token rewards (implicit: ``beta * log pi_phi / pi_ref``, eq. 3 per token; explicit:
the step's probability on its last token), summed into reasoning steps (eq. 3), their running sums
(q-values, eq. 2), and one aggregated score (the paper's best-of-N score is the minimum step
reward). :func:`assemble` is the one place that turns token rewards into those numbers: in-process
scoring, the Ray Data evaluation pass and the Serve endpoint all call it. Pure PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from prm_ray.artifacts import read_prm_card
from prm_ray.core.reward import (
    AGGREGATIONS,
    STEP_SPLITS,
    aggregate,
    explicit_token_rewards,
    q_values,
    response_logprobs,
    step_label_logits,
    step_rewards,
    token_rewards,
)
from prm_ray.models import load_causal_lm, load_tokenizer
from prm_ray.tokens import TokenizedItem, collate_items, encode_pair, max_context, pad_token_id, step_label_token_ids

__all__ = ["ExplicitPRM", "ImplicitPRM", "PRM", "StepScores", "assemble", "check_aggregation", "load_prm"]


@dataclass
class StepScores:
    """Process rewards of one response.

    ``steps`` concatenate back to the response text. ``token_rewards`` covers every response
    token (``num_tokens`` of them, including the appended EOS). ``q_values[t]`` is the running sum
    of ``step_rewards`` up to step t, so ``q_values[-1]`` is the outcome reward r(y). ``score`` is
    ``step_rewards`` aggregated with ``aggregation``; ``scores`` holds every aggregation.
    """

    steps: list[str]
    step_rewards: list[float]
    q_values: list[float]
    token_rewards: list[float]
    num_tokens: int
    score: float
    aggregation: str
    scores: dict[str, float] = field(default_factory=dict)


def check_aggregation(method: str) -> str:
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; valid: {', '.join(AGGREGATIONS)}")
    return method


def assemble(tok_rewards: torch.Tensor, step_ids: torch.Tensor, items: Sequence[TokenizedItem],
             aggregations: str | Sequence[str], starts: Sequence[int] | None = None) -> list[StepScores]:
    """Token rewards ``[B, L]`` -> per-response :class:`StepScores`: step rewards (eq. 3), q-values
    (eq. 2) and every aggregation, sliced to each item's own steps and tokens.

    ``step_ids`` ``[B, L]`` gives each token's step (-1 off the response). ``aggregations``: one
    method for all items or one per item (it picks ``score``). ``starts[b]``: the column where item
    b's response begins in ``tok_rewards`` (default: its ``prompt_len``; the shared-prompt batch
    of :mod:`prm_ray.serve.batcher` lays rows out without the prompt).
    """
    methods = [aggregations] * len(items) if isinstance(aggregations, str) else list(aggregations)
    num_steps = max(len(it.steps) for it in items)
    step_r, step_mask = step_rewards(tok_rewards, step_ids, num_steps)
    q = q_values(step_r, step_mask)
    scores = {m: aggregate(step_r, step_mask, m).tolist() for m in AGGREGATIONS}
    step_r, q = step_r.tolist(), q.tolist()
    out = []
    for b, (it, method) in enumerate(zip(items, methods)):
        n_steps = len(it.steps)
        start = it.prompt_len if starts is None else starts[b]
        out.append(StepScores(
            steps=list(it.steps), step_rewards=step_r[b][:n_steps], q_values=q[b][:n_steps],
            token_rewards=tok_rewards[b, start : start + it.num_response_tokens].tolist(),
            num_tokens=it.num_response_tokens, score=scores[method][b], aggregation=method,
            scores={m: v[b] for m, v in scores.items()}))
    return out


class PRM:
    """What every PRM shares: tokenization, length-sorted batching, step splitting and
    :func:`assemble`. A subclass says how a padded batch becomes token rewards
    (:meth:`batch_token_rewards`)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, step_separator: str = "\n\n",
                 aggregation: str = "min", append_eos: bool = True, step_split: str = "blank_line") -> None:
        check_aggregation(aggregation)
        if step_split not in STEP_SPLITS:
            raise ValueError(f"step_split must be one of {STEP_SPLITS}, got {step_split!r}")
        if not step_separator:
            raise ValueError("step_separator must be a non-empty string")
        if append_eos and tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True but the tokenizer has no eos_token_id")
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                             f"{model.config.vocab_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.step_separator = step_separator
        self.step_split = step_split  # blank_line, or the released eval's "Step N:" steps
        self.aggregation = aggregation
        self.append_eos = append_eos
        self.max_length: int | None = max_context(model)
        self.pad_id: int = pad_token_id(tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompt: str, response: str, *, chat_template: bool = True,
               index: int | None = None) -> TokenizedItem:
        """Tokenize one prompt+response the way a sampler produced it (see :func:`encode_pair`)."""
        return encode_pair(self.tokenizer, prompt, response, chat_template=chat_template,
                           append_eos=self.append_eos, separator=self.step_separator,
                           max_length=self.max_length, index=index, step_split=self.step_split)

    def collate(self, items: Sequence[TokenizedItem]) -> dict[str, torch.Tensor]:
        """Right-pad items into ``input_ids``, ``attention_mask``, ``response_mask``, ``step_ids``."""
        return collate_items(items, self.pad_id)

    def batch_token_rewards(self, batch: dict[str, torch.Tensor], num_steps: int) -> torch.Tensor:
        """``[B, L]`` token rewards of a collated batch, on CPU."""
        raise NotImplementedError

    def score_tokenized(self, items: Sequence[TokenizedItem], *, aggregation: str | None = None) -> list[StepScores]:
        """Score already-tokenized items as ONE batch (no sorting or splitting)."""
        method = check_aggregation(aggregation or self.aggregation)
        if not items:
            return []
        batch = self.collate(items)
        tok_r = self.batch_token_rewards(batch, max(len(it.steps) for it in items))
        return assemble(tok_r, batch["step_ids"], items, method)

    def score(self, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 16,
              aggregation: str | None = None, chat_template: bool = True) -> list[StepScores]:
        """Score each (prompt, response) pair; results come back in input order.

        Items are sorted by length (longest first) into batches of ``batch_size`` to reduce
        padding; with right padding and causal attention the result does not depend on the batch.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        method = check_aggregation(aggregation or self.aggregation)
        items = [self.encode(p, r, chat_template=chat_template, index=i)
                 for i, (p, r) in enumerate(zip(prompts, responses))]
        order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
        results: list[StepScores | None] = [None] * len(items)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, res in zip(chunk, self.score_tokenized([items[i] for i in chunk], aggregation=method)):
                results[i] = res
        return results  # type: ignore[return-value]


class ImplicitPRM(PRM):
    """An implicit PRM: ``r_phi(y) = beta * log pi_phi(y) / pi_ref(y)`` (Prop. 3.1).

    ``ref_model=None`` is the paper's "w/o ref" mode (Table 4): token reward ``beta * log pi_phi``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, ref_model: torch.nn.Module | None = None, *,
                 beta: float = 0.05, step_separator: str = "\n\n", aggregation: str = "min",
                 append_eos: bool = True, step_split: str = "blank_line") -> None:
        if ref_model is not None and model.config.vocab_size != ref_model.config.vocab_size:
            raise ValueError(f"PRM and reference models have different vocab_size ({model.config.vocab_size} vs "
                             f"{ref_model.config.vocab_size}); the log-ratio needs both models over the same tokenizer")
        super().__init__(model, tokenizer, step_separator=step_separator, aggregation=aggregation,
                         append_eos=append_eos, step_split=step_split)
        self.ref_model = ref_model.eval() if ref_model is not None else None
        self.beta = float(beta)
        self.max_length = max_context(model, ref_model)

    @classmethod
    def from_pretrained(cls, path: str, ref_path: str | None = None, beta: float = 0.05, *,
                        step_separator: str = "\n\n", aggregation: str = "min", device: str | torch.device = "cpu",
                        dtype: torch.dtype | str = torch.float32, append_eos: bool = True,
                        step_split: str = "blank_line") -> ImplicitPRM:
        """Load the PRM (and optionally the reference) as ``AutoModelForCausalLM`` + its tokenizer.

        The reference's tokenizer (if it ships one) must have exactly the PRM tokenizer's vocabulary.
        """
        tokenizer = load_tokenizer(path, "PRM")
        model = load_causal_lm(path, dtype, device, "PRM")
        ref_model = None
        if ref_path is not None:
            try:
                ref_tokenizer = load_tokenizer(ref_path, "reference model")
            except (OSError, ValueError) as exc:  # a bare checkpoint without tokenizer files
                if isinstance(exc, FileNotFoundError):
                    raise
                ref_tokenizer = None
            if ref_tokenizer is not None and ref_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise ValueError(f"the tokenizers of {path!r} and {ref_path!r} differ ({len(tokenizer)} vs "
                                 f"{len(ref_tokenizer)} tokens); the PRM and its reference must share one vocabulary")
            ref_model = load_causal_lm(ref_path, dtype, device, "reference model")
        return cls(model, tokenizer, ref_model, beta=beta, step_separator=step_separator,
                   aggregation=aggregation, append_eos=append_eos, step_split=step_split)

    @torch.inference_mode()
    def token_rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                      ref_logp: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L]`` token rewards ``beta * (logp_phi - logp_ref)`` on response tokens, 0 elsewhere.

        The tensor-level entry point for pipeline stages with their own batching; returned on CPU.
        ``ref_logp``: the reference's per-token log-probs computed elsewhere (the evaluation pass
        caches them once per held-out set), used instead of running ``ref_model``.
        """
        dev = self.device
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        response_mask = response_mask.to(dev).bool()
        logp = response_logprobs(self.model, input_ids, attention_mask, response_mask)
        if ref_logp is not None:
            ref_logp = ref_logp.to(dev)
        elif self.ref_model is not None:
            ref_logp = response_logprobs(self.ref_model, input_ids, attention_mask, response_mask)
        return token_rewards(logp, ref_logp, response_mask, self.beta).cpu()

    def batch_token_rewards(self, batch: dict[str, torch.Tensor], num_steps: int) -> torch.Tensor:
        return self.token_rewards(batch["input_ids"], batch["attention_mask"], batch["response_mask"])

    def __repr__(self) -> str:
        return (f"ImplicitPRM(beta={self.beta}, ref={'yes' if self.ref_model is not None else 'no'}, "
                f"aggregation={self.aggregation!r}, step_separator={self.step_separator!r}, "
                f"append_eos={self.append_eos})")


class ExplicitPRM(PRM):
    """A PRM trained on step labels (the Math-Shepherd baseline): step t scores
    ``sigmoid(logit(+) - logit(-))`` read at the step's last token, with no reference model.

    The step score is placed on the step's last token (:func:`prm_ray.core.reward.explicit_token_rewards`),
    so the step "sum" is the score itself and :func:`assemble` applies unchanged. ``q_values`` are
    then running sums of probabilities, which carry no meaning of their own; use ``min`` (the
    paper's and Math-Shepherd's choice).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, positive_token: str = "+", negative_token: str = "-",
                 step_separator: str = "\n\n", aggregation: str = "min", append_eos: bool = True,
                 step_split: str = "blank_line") -> None:
        super().__init__(model, tokenizer, step_separator=step_separator, aggregation=aggregation,
                         append_eos=append_eos, step_split=step_split)
        self.positive_id, self.negative_id = step_label_token_ids(tokenizer, [positive_token, negative_token])

    @classmethod
    def from_pretrained(cls, path: str, *, positive_token: str = "+", negative_token: str = "-",
                        step_separator: str = "\n\n", aggregation: str = "min", device: str | torch.device = "cpu",
                        dtype: torch.dtype | str = torch.float32, append_eos: bool = True,
                        step_split: str = "blank_line") -> ExplicitPRM:
        return cls(load_causal_lm(path, dtype, device, "PRM"), load_tokenizer(path, "PRM"),
                   positive_token=positive_token, negative_token=negative_token,
                   step_separator=step_separator, aggregation=aggregation, append_eos=append_eos,
                   step_split=step_split)

    @torch.inference_mode()
    def batch_token_rewards(self, batch: dict[str, torch.Tensor], num_steps: int) -> torch.Tensor:
        dev = self.device
        logits = self.model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
        step_ids = batch["step_ids"].to(dev)
        z, mask = step_label_logits(logits.float(), step_ids, self.positive_id, self.negative_id, num_steps)
        return explicit_token_rewards(z, mask, step_ids).cpu()

    def __repr__(self) -> str:
        return f"ExplicitPRM(aggregation={self.aggregation!r}, step_separator={self.step_separator!r})"


def load_prm(path: str, ref_path: str | None = None, beta: float | None = None, *, reference: bool = True,
             **kwargs) -> PRM:
    """Load a trained PRM as the kind its card (``prm_ray_prm.json``) says: implicit or explicit.

    For an implicit PRM, ``beta`` and ``ref_path`` default to the card's; ``reference=False``
    loads no reference model ("w/o ref", or reference log-probs supplied to
    :meth:`ImplicitPRM.token_rewards`). An explicit PRM takes no reference and reads its step label
    tokens from the card. ``kwargs``: ``from_pretrained``'s.
    """
    card = read_prm_card(path)
    if card.get("kind") == "explicit":
        if ref_path is not None:
            raise ValueError(f"{path} is an explicit PRM ({card.get('objective')}); it takes no reference model")
        pos, neg = card.get("step_label_tokens", ["+", "-"])
        return ExplicitPRM.from_pretrained(path, positive_token=pos, negative_token=neg, **kwargs)
    beta = float(beta if beta is not None else card.get("beta", 0.05))
    ref = (ref_path if ref_path is not None else card.get("reference_model")) if reference else None
    return ImplicitPRM.from_pretrained(path, ref, beta, **kwargs)
