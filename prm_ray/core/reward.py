"""Implicit process rewards: token log-probs -> token rewards -> step rewards -> q-values -> scores.

Everything here is pure, batched PyTorch over right-padded ``[B, L]`` tensors, written to be read
next to the paper (Yuan et al., 2024, "Free Process Rewards without Process Labels"):

* token reward (eq. 3 at token granularity): ``beta * log pi_phi(y_i | y_<i) / pi_ref(y_i | y_<i)``
* q-value (eq. 2 / Prop. 3.1):  ``q^t = sum_{i<=t} token reward_i``
  (= ``beta * log E_{pi_ref(y | y_<=t)} exp(r(y) / beta)``)
* step reward (eq. 3):  ``r^t = q^t - q^{t-1}`` = the sum of the token rewards inside step t
* outcome (implicit) reward: ``r(y) = beta * log pi_phi(y) / pi_ref(y)`` = q at the last token
  (:func:`implicit_reward` from token rewards, :func:`sequence_reward` from sequence log-probs)

Conventions (shared with the losses and the scorer):

* ``mask`` / ``response_mask`` is a bool ``[B, L]`` tensor, True exactly on response tokens
  (prompt tokens and padding are False); column i always refers to *token i* itself.
* ``step_ids`` is a long ``[B, L]`` tensor: the step index of each response token, -1 elsewhere.
"""

from __future__ import annotations

import bisect
import inspect
import math
import re

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

AGGREGATIONS: tuple[str, ...] = ("min", "sum", "last_q", "mean", "min_q", "sum_q", "last", "prod")
"""Ways to turn a response's step rewards into one score (see :func:`aggregate`)."""

__all__ = [
    "AGGREGATIONS",
    "LOGPROB_CHUNK",
    "STEP_SPLITS",
    "ResponseLogprobs",
    "aggregate",
    "chunked_head_logprobs",
    "explicit_token_rewards",
    "forward_parameters",
    "gather_logprobs",
    "head_and_trunk",
    "implicit_reward",
    "masked_head_logprobs",
    "q_values",
    "release_steps",
    "response_logprobs",
    "sequence_reward",
    "step_end_index",
    "step_ids_from_offsets",
    "step_label_logits",
    "step_rewards",
    "steps_to_score",
    "token_q_values",
    "token_rewards",
]


# ---------------------------------------------------------------------------------------------
# Log-probabilities and token rewards
# ---------------------------------------------------------------------------------------------


def forward_parameters(model: torch.nn.Module) -> set[str]:
    """Names ``model.forward`` accepts (``logits_to_keep``, ``use_cache``, ... differ by model)."""
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return set()


LOGPROB_CHUNK = 1024
"""Response positions per LM-head chunk in :func:`response_logprobs`: a ``[1024, V]`` float32 block
is 128 MB at a 32k vocabulary, 512 MB at Llama-3's 128k."""

# Model types whose logits are exactly ``lm_head(last hidden state)``: no soft-capping (Gemma 2),
# logit scale (Cohere, Granite) or other post-processing that a chunked head would skip.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2"})


def head_and_trunk(model: torch.nn.Module) -> tuple[torch.nn.Linear, torch.nn.Module] | None:
    """The LM head and the trunk (the part that returns hidden states) of a Hugging Face causal LM
    whose logits are ``head(trunk(x))``, or None when that cannot be relied on."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    trunk = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or trunk is None or trunk is model:
        return None
    return head, trunk


def _head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def chunked_head_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                          chunk_size: int = LOGPROB_CHUNK) -> torch.Tensor:
    """``log softmax(head(hidden[n]))[targets[n]]`` for each of the ``N`` rows of ``hidden`` ``[N, H]``.

    ``chunk_size`` rows at a time, in at least float32, so no more than a ``[chunk_size, V]`` block
    of logits exists at once. Under autograd each chunk is checkpointed: backward recomputes its
    logits (one more LM-head matmul) instead of keeping ``[N, V]`` float32 activations alive.
    """
    grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    out = []
    for s in range(0, hidden.shape[0], chunk_size):
        args = (hidden[s : s + chunk_size], head.weight, head.bias, targets[s : s + chunk_size])
        out.append(checkpoint(_head_logprobs, *args, use_reentrant=False) if grad else _head_logprobs(*args))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))


def masked_head_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, mask: torch.Tensor,
                         chunk_size: int = LOGPROB_CHUNK) -> torch.Tensor:
    """``log softmax(head(hidden[b, j]))[targets[b, j]]`` where ``mask``, 0 elsewhere. Shape ``[B, T]``.

    ``hidden[:, j]`` (``[B, T, H]``) must already predict ``targets[:, j]``; only masked positions
    go through the head (:func:`chunked_head_logprobs`)."""
    logp = chunked_head_logprobs(hidden[mask], head, targets[mask], chunk_size)
    return torch.zeros(mask.shape, dtype=logp.dtype, device=hidden.device).masked_scatter(mask, logp)


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_size: int = LOGPROB_CHUNK,
) -> torch.Tensor:
    """``log pi(token_i | tokens_<i)`` at every response position i, 0 elsewhere. Shape ``[B, L]``.

    ``input_ids`` are right-padded prompt+response ids. Column i holds the log-prob OF token i,
    read from the logits at position i-1 (the usual one-position shift), so token 0 can never be a
    response token (it has no context): every row needs at least one prompt token (e.g. BOS).

    ``model`` is any causal LM returning ``.logits`` (or a logits tensor) of shape ``[B, L, V]``.
    The log-softmax runs in at least float32 (float64 stays float64) and only at response positions.
    For Hugging Face models with a plain LM head (:func:`head_and_trunk`) and ``chunk_size > 0``, the
    head runs on the response positions' hidden states ``chunk_size`` at a time
    (:func:`chunked_head_logprobs`), so the ``[tokens, V]`` logits never exist whole; otherwise
    the model's own forward gives the logits (``logits_to_keep`` skips the common prompt prefix).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    response_mask = response_mask.bool()
    if response_mask.shape != input_ids.shape or attention_mask.shape != input_ids.shape:
        raise ValueError(
            "input_ids, attention_mask and response_mask must have the same shape, got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(response_mask.shape)}"
        )
    if bool(response_mask[:, 0].any()):
        raise ValueError("token 0 cannot be a response token: each row needs a non-empty prompt")

    B, L = input_ids.shape
    if not bool(response_mask.any()):
        return torch.zeros(B, L, dtype=torch.float32, device=input_ids.device)

    # Logits at position j predict token j+1, so we need positions first_response-1 .. L-2.
    first = int(response_mask.float().argmax(dim=1).masked_fill(~response_mask.any(1), L).min())
    targets, mask = input_ids[:, first:], response_mask[:, first:]
    parts = head_and_trunk(model) if chunk_size > 0 else None
    if parts is not None:
        head, trunk = parts
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        tail = masked_head_logprobs(hidden[:, first - 1 : -1], head, targets, mask, chunk_size)
    else:
        params = forward_parameters(model)
        kwargs: dict = {"attention_mask": attention_mask}
        if "use_cache" in params:
            kwargs["use_cache"] = False
        # Right padding means positions are contiguous, so "keep the last k logits" is exact.
        keep = L - (first - 1)
        if "logits_to_keep" in params:
            kwargs["logits_to_keep"] = keep
        result = model(input_ids=input_ids, **kwargs)
        logits = result.logits if hasattr(result, "logits") else result
        logits = logits[:, -keep:]  # no-op when the model honoured logits_to_keep
        # logits[:, j] now predicts token (first + j); drop the last one (predicts past the end).
        tail = gather_logprobs(logits[:, :-1], targets, mask)
    head_cols = torch.zeros(B, first, dtype=tail.dtype, device=input_ids.device)
    return torch.cat([head_cols, tail], dim=1)


class ResponseLogprobs(torch.nn.Module):
    """A causal LM whose forward returns :func:`response_logprobs` (or, without a response mask,
    the LM's logits). Training wraps this module in DDP or FSDP, so every use of a parameter,
    the chunked LM head included, happens inside the wrapped forward."""

    def __init__(self, lm: torch.nn.Module, chunk_size: int = LOGPROB_CHUNK) -> None:
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor | None = None) -> torch.Tensor:
        if response_mask is None:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return response_logprobs(self.lm, input_ids, attention_mask, response_mask, self.chunk_size)


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits[b, j])[targets[b, j]]`` where ``mask``, 0 elsewhere. Shape ``[B, T]``.

    ``logits[:, j]`` must already predict ``targets[:, j]``. The log-softmax runs in at least
    float32 and only on masked rows, so the float32 copy of the ``[*, V]`` logits stays small; the
    scatter back is out of place, so this stays differentiable for training.
    """
    rows = logits[mask]  # [N, V], only the positions we need
    dtype = torch.promote_types(rows.dtype, torch.float32)
    logp = torch.log_softmax(rows.to(dtype), dim=-1).gather(-1, targets[mask][:, None]).squeeze(-1)
    return torch.zeros(mask.shape, dtype=dtype, device=logits.device).masked_scatter(mask, logp)


def token_rewards(
    logp: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token implicit process reward ``beta * (logp - ref_logp)`` on ``mask``, 0 elsewhere.

    Eq. 3 at token granularity. ``ref_logp=None`` is the paper's "w/o ref" mode (Table 4,
    section 5.3.2): ``beta * logp``, i.e. the reference is dropped from the ratio.
    """
    diff = logp if ref_logp is None else logp - ref_logp
    return torch.where(mask.bool(), beta * diff, torch.zeros((), dtype=diff.dtype, device=diff.device))


def implicit_reward(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Outcome reward ``r(y) = beta * log pi_phi(y) / pi_ref(y)``: token rewards summed over the response.

    Shape ``[B]``. This is what the training losses (eq. 5 etc.) consume.
    """
    return (token_rewards * mask.to(token_rewards.dtype)).sum(dim=-1)


def sequence_reward(logp: torch.Tensor, ref_logp: torch.Tensor | None, beta: float) -> torch.Tensor:
    """Outcome reward ``r(y) = beta * (log pi_phi(y) - log pi_ref(y))`` from *sequence* log-probs ``[B]``.

    The same number as :func:`implicit_reward` of the token rewards (a sum of per-token log-ratios
    is the log-ratio of the sums), in the form training uses: the reference's log-prob of each
    response is computed once, before training, as one number. ``ref_logp=None``: "w/o ref".
    """
    return beta * (logp if ref_logp is None else logp - ref_logp)


def token_q_values(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level q-values (Prop. 3.1 with y_t a token): running sum over response tokens.

    Non-response positions are 0 in the output (not the running value).
    """
    m = mask.to(token_rewards.dtype)
    return torch.cumsum(token_rewards * m, dim=-1) * m


# ---------------------------------------------------------------------------------------------
# Step splitting
# ---------------------------------------------------------------------------------------------


def _step_starts(text: str, separator: str) -> list[int]:
    """Character positions where steps start (always begins with 0 when ``text`` is non-empty).

    The text is split like ``text.split(separator)``; every *non-blank* piece (one with a
    non-whitespace character) starts a new step at its first non-whitespace character, except the
    first non-blank piece, whose step starts at 0. Blank pieces never start a step.
    """
    if not separator:
        raise ValueError("separator must be a non-empty string")
    starts = [0]
    pos = 0
    seen_content = False
    for piece in text.split(separator):
        stripped = piece.lstrip()
        if stripped.strip():  # non-blank piece
            if seen_content:
                starts.append(pos + len(piece) - len(stripped))
            seen_content = True
        pos += len(piece) + len(separator)
    return starts


STEP_SPLITS: tuple[str, ...] = ("blank_line", "release")
"""How a response is cut into steps for scoring: ``blank_line`` (prm-ray's default: the raw
response split on the separator, :func:`step_ids_from_offsets`) or ``release`` (the released
eval's ``Step N:`` markers, :func:`release_steps`)."""

_STEP_MARKER = re.compile(r"Step \d+:")


def release_steps(response: str) -> list[str]:
    """The released eval's steps: the response split on ``Step N:`` markers, each piece stripped
    (text before the first marker is step 1; any other "Step" inside a piece becomes "step"), then
    renumbered ``Step k: ``. A response without markers is one step; an empty one has none."""
    pieces = [p.strip().replace("Step", "step") for p in _STEP_MARKER.split(response) if p.strip()]
    return [f"Step {k + 1}: {p}" for k, p in enumerate(pieces)]


def steps_to_score(response: str, step_split: str = "blank_line",
                   separator: str = "\n\n") -> tuple[str, list[int] | None]:
    """``(text, starts)``: the text that is tokenized and scored, and where its steps start
    (``None``: split on ``separator``, :func:`step_ids_from_offsets`). ``release`` rewrites the
    response as its :func:`release_steps` joined by ``separator``, as the released eval scores it
    (each step then ends with its separator; the last one gets the end-of-turn token)."""
    if step_split == "blank_line":
        return response, None
    if step_split != "release":
        raise ValueError(f"step_split must be one of {STEP_SPLITS}, got {step_split!r}")
    steps = release_steps(response)
    starts, pos = [], 0
    for step in steps:
        starts.append(pos)
        pos += len(step) + len(separator)
    return separator.join(steps), starts or None


def step_ids_from_offsets(
    text: str, offsets: list[tuple[int, int]], separator: str = "\n\n", starts: list[int] | None = None
) -> tuple[list[int], list[str]]:
    """Assign every response token to a reasoning step; return ``(step_id per token, step texts)``.

    ``offsets`` are the tokenizer's ``(start, end)`` character spans of the response tokens within
    ``text`` (``return_offsets_mapping=True``). The step texts concatenate back to ``text`` exactly.

    Convention (the paper's eval code: steps are joined by ``separator``, a step's last token is
    its separator, the last step also contains the appended end-of-turn token):

    1. Characters. Split like ``text.split(separator)``. Each non-blank piece begins a new step at
       its first non-whitespace character; the first step begins at character 0. So a step is one
       piece of content plus everything up to the next content: its separator, any extra
       separators or whitespace ("\\n\\n\\n", "\\n\\n \\n\\n", a trailing separator) fold into the
       step *before* them; a leading separator/whitespace folds into the first step. Blank pieces
       never create a step. No separator (or only whitespace) gives a single step.
    2. Tokens. A token belongs to the step containing its last character (``end - 1``), so a
       multi-character token such as ".\\n\\n" closes its step and "\\n\\nThe" opens the next.
       Zero-width tokens (``start == end``, e.g. an appended EOS) join the step of the preceding
       token (leading zero-width tokens join the first token's step).
    3. A step that received no token (only possible when one multi-character token covers it
       and ends in a later step) is merged into the following step, so every returned step has
       at least one token and the step ids are ``0..n-1`` in order.

    An empty ``text`` with only zero-width tokens (an empty response plus EOS) is one step ``""``;
    no tokens at all gives ``([], [])``. ``starts``, when given, replaces rule 1: the characters
    where steps start (the first is 0), as :func:`steps_to_score` returns them.
    """
    n_chars = len(text)
    for i, (s, e) in enumerate(offsets):
        if not 0 <= s <= e <= n_chars:
            raise ValueError(f"offset {i} = ({s}, {e}) is outside the text (length {n_chars})")
    if not offsets:
        if text:
            raise ValueError("no token offsets given for a non-empty text")
        return [], []

    if starts is None:
        starts = _step_starts(text, separator) if text else [0]
    bounds = starts + [n_chars]

    # Step of the step-start at or before each token's last character.
    raw: list[int | None] = [
        bisect.bisect_right(starts, e - 1) - 1 if e > s else None for s, e in offsets
    ]
    # Zero-width tokens: the previous token's step; leading ones take the next token's step.
    following = next((r for r in raw if r is not None), 0)
    prev: int | None = None
    for i, r in enumerate(raw):
        if r is None:
            raw[i] = following if prev is None else prev
        else:
            prev = r

    # Keep only steps that own a token. A step without tokens has all its characters inside
    # tokens of a later step (a token belongs to the step of its LAST character), so its text
    # joins the next kept step; characters after the last kept step join that step.
    used = sorted(set(raw))
    remap = {old: new for new, old in enumerate(used)}
    texts = []
    for new, old in enumerate(used):
        lo = 0 if new == 0 else bounds[used[new - 1] + 1]
        hi = n_chars if new == len(used) - 1 else bounds[old + 1]
        texts.append(text[lo:hi])
    return [remap[r] for r in raw], texts


# ---------------------------------------------------------------------------------------------
# Step rewards, q-values, aggregation
# ---------------------------------------------------------------------------------------------


def step_rewards(
    token_rewards: torch.Tensor, step_ids: torch.Tensor, num_steps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum token rewards per step: ``r^t = q^t - q^{t-1}`` (eq. 3). Returns ``(rewards, step_mask)``.

    ``step_ids`` is ``[B, L]`` long with -1 on non-response positions. Output is ``[B, S]`` with
    ``S = num_steps`` (default: the largest step id + 1); ``step_mask[b, s]`` is True iff step s of
    row b has at least one token. Padded step slots hold 0 and must be masked by the caller
    (:func:`aggregate` does).
    """
    if step_ids.shape != token_rewards.shape:
        raise ValueError(
            f"step_ids {tuple(step_ids.shape)} and token_rewards {tuple(token_rewards.shape)} differ"
        )
    step_ids = step_ids.long()
    if num_steps is None:
        num_steps = int(step_ids.max().clamp(min=-1)) + 1 if step_ids.numel() else 0
    if step_ids.numel() and int(step_ids.max()) >= num_steps:
        raise ValueError(f"step id {int(step_ids.max())} >= num_steps={num_steps}")
    B = token_rewards.shape[0]
    valid = step_ids >= 0
    if num_steps == 0:  # every row empty: nothing to scatter (slot 0 does not exist)
        return token_rewards.new_zeros(B, 0), torch.zeros(B, 0, dtype=torch.bool, device=step_ids.device)
    idx = step_ids.clamp(min=0)  # invalid positions add 0 to slot 0, harmless
    values = torch.where(valid, token_rewards, torch.zeros_like(token_rewards))
    rewards = token_rewards.new_zeros(B, num_steps).scatter_add_(1, idx, values)
    counts = torch.zeros(B, num_steps, dtype=torch.long, device=step_ids.device)
    counts.scatter_add_(1, idx, valid.long())
    return rewards, counts > 0


def q_values(step_rewards: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """Step-level q-values ``q^t = sum_{s<=t} r^s`` (eq. 2 / Prop. 3.1); 0 at padded step slots."""
    m = step_mask.to(step_rewards.dtype)
    return torch.cumsum(step_rewards * m, dim=-1) * m


def aggregate(step_rewards: torch.Tensor, step_mask: torch.Tensor, method: str = "min") -> torch.Tensor:
    """One score per response from its step rewards. Shape ``[B]``.

    * ``"min"``: the lowest step reward (the paper's best-of-N score, section 4.1). Padded slots
      are filled with +inf before the min, so they can never win (exact, unlike the reference
      code's +1e3 padding, which a reward above 1e3 would break).
    * ``"sum"``: the sum of step rewards.
    * ``"last_q"``: q at the final step = the outcome reward ``r(y)`` (equal to ``"sum"`` up to
      floating-point, kept as its own name because it means "use the ORM score").
    * ``"mean"``: the average step reward.
    * ``"min_q"``: the lowest q-value ``min_t q^t``, the released eval's "accumulative-min" (its
      ``min`` is our ``min``); ``"sum_q"``: ``sum_t q^t``, its "accumulative-sum".
    * ``"last"``: the last step's reward; ``"prod"``: the product of the step rewards. For an
      explicit PRM, whose step rewards are probabilities, these are the usual alternatives to
      ``min`` (the last step's, and PRM800K's product); an implicit PRM's analogue of ``prod`` is
      ``sum``.

    A row with no steps (an empty response scored without an EOS token) scores 0.0 under every
    method: the value of an empty sum, q^0 = 0. (With EOS appended, an empty response has one step
    holding its EOS token and is scored from it.)
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; valid: {', '.join(AGGREGATIONS)}")
    mask = step_mask.bool()
    has_steps = mask.any(dim=-1)
    zero = torch.zeros((), dtype=step_rewards.dtype, device=step_rewards.device)
    masked = torch.where(mask, step_rewards, zero)
    if method == "min":
        filled = step_rewards.masked_fill(~mask, math.inf)
        score = filled.min(dim=-1).values if step_rewards.shape[-1] else zero.expand(mask.shape[0])
    elif method == "sum":
        score = masked.sum(dim=-1)
    elif method in ("last_q", "last"):
        values = q_values(step_rewards, mask) if method == "last_q" else step_rewards
        # index of the last valid step in each row (0 if none; fixed up below)
        positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=-1).values
        score = values.gather(-1, last.clamp(min=0)[:, None]).squeeze(-1) if mask.shape[-1] else zero.expand(mask.shape[0])
    elif method == "prod":
        score = torch.where(mask, step_rewards, torch.ones_like(step_rewards)).prod(dim=-1)
    elif method == "mean":
        score = masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1).to(step_rewards.dtype)
    else:  # min_q, sum_q: over the running sums
        q = q_values(step_rewards, mask)
        if method == "sum_q":
            score = q.sum(dim=-1)
        else:
            score = q.masked_fill(~mask, math.inf).min(dim=-1).values if mask.shape[-1] else zero.expand(mask.shape[0])
    return torch.where(has_steps, score, zero)


# ---------------------------------------------------------------------------------------------
# Explicit (step-labelled) PRMs: the Math-Shepherd baseline
# ---------------------------------------------------------------------------------------------


def step_end_index(step_ids: torch.Tensor, num_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of each step's last token: ``(index [B, S], step_mask [B, S])``.

    An explicit PRM reads its step score where the step ends (Math-Shepherd and OpenRLHF put a tag
    token there; here it is the step's own last token, its separator or the appended EOS, so the
    PRM scores exactly the sequences the implicit PRM scores). Steps without tokens get index 0 and
    ``step_mask`` False.
    """
    step_ids = step_ids.long()
    if num_steps is None:
        num_steps = int(step_ids.max().clamp(min=-1)) + 1 if step_ids.numel() else 0
    B, L = step_ids.shape
    positions = torch.arange(L, device=step_ids.device).expand(B, L)
    valid = step_ids >= 0
    index = torch.full((B, num_steps), -1, dtype=torch.long, device=step_ids.device)
    if num_steps:
        index.scatter_reduce_(1, step_ids.clamp(min=0), torch.where(valid, positions, -1), reduce="amax")
    mask = index >= 0
    return index.clamp(min=0), mask


def step_label_logits(
    logits: torch.Tensor, step_ids: torch.Tensor, positive_id: int, negative_id: int,
    num_steps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An explicit PRM's per-step logit ``z_t = logit(+) - logit(-)`` at each step's last token.

    ``logits`` is the LM's ``[B, L, V]`` output; ``sigmoid(z_t)`` is the PRM's probability that
    step t is good (the two-way softmax over the "+" and "-" tokens, as Math-Shepherd reads it).
    Returns ``(z [B, S], step_mask [B, S])``; padded slots hold 0.
    """
    index, mask = step_end_index(step_ids, num_steps)
    pair = logits[..., [positive_id, negative_id]]  # [B, L, 2]
    at_end = pair.gather(1, index[..., None].expand(-1, -1, 2))  # [B, S, 2]
    z = at_end[..., 0] - at_end[..., 1]
    return torch.where(mask, z, torch.zeros((), dtype=z.dtype, device=z.device)), mask


def explicit_token_rewards(step_logits: torch.Tensor, step_mask: torch.Tensor, step_ids: torch.Tensor) -> torch.Tensor:
    """Place each step's score ``sigmoid(z_t)`` on the step's last token, 0 elsewhere: ``[B, L]``.

    With this layout :func:`step_rewards` (a sum over the step's tokens) gives back
    ``sigmoid(z_t)``, so an explicit PRM runs through the same step-reward, q-value and aggregation
    code as the implicit one (``min`` = the lowest step probability, Math-Shepherd's score).
    """
    index, _ = step_end_index(step_ids, step_logits.shape[-1])
    probs = torch.sigmoid(step_logits.float()).masked_fill(~step_mask, 0.0)
    out = torch.zeros(step_ids.shape, dtype=probs.dtype, device=probs.device)
    rows = torch.arange(out.shape[0], device=out.device)[:, None].expand_as(index)
    out[rows[step_mask], index[step_mask]] = probs[step_mask]
    return out
