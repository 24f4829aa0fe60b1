"""Tiny models and tokenizers built locally: for tests, the offline demo and benchmarks.

Nothing here touches the Hugging Face Hub. A tokenizer is trained with ``tokenizers`` on
text the caller gives, and models are real transformers architectures (Llama, OLMo 2)
with random weights, saved exactly as a Hub checkpoint would be (``config.json``,
safetensors, tokenizer files), so the code under test takes its real loading paths.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from mergekit_ftt.chat_templates import TULU_CHAT_TEMPLATE

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<|endoftext|>"  # OLMo 2 style: BOS = EOS
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

Architecture = Literal["llama", "olmo2"]


def build_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 256,
    extra_tokens: Iterable[str] = (),
):
    """Train a small byte-level BPE tokenizer on ``corpus``.

    Returns a ``PreTrainedTokenizerFast`` with OLMo 2's conventions (BOS = EOS =
    ``<|endoftext|>``, a separate pad token), the Tülu chat template and the chat role
    markers as special tokens; ``extra_tokens`` are appended after training, the way a
    fine-tuning recipe adds tokens to its base model's vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, EOS_TOKEN, *CHAT_TOKENS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        model_max_length=2048,
    )
    wrapped.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
    extra = list(extra_tokens)
    if extra:
        wrapped.add_tokens(extra, special_tokens=True)
    wrapped.chat_template = TULU_CHAT_TEMPLATE
    return wrapped


def tiny_config(
    architecture: Architecture = "llama",
    vocab_size: int = 320,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 512,
    eos_token_id: int = 1,
    pad_token_id: int = 0,
):
    """A transformers config of the given architecture and size."""
    from transformers import LlamaConfig, Olmo2Config

    config_class = {"llama": LlamaConfig, "olmo2": Olmo2Config}[architecture]
    return config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def tiny_config_for(tokenizer, architecture: Architecture = "llama", **settings):
    """``tiny_config`` with the vocabulary and the end and padding tokens of ``tokenizer``."""
    return tiny_config(
        architecture,
        **{
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **settings,
        },
    )


def save_random_model(
    config,
    path: str | Path,
    seed: int,
    tokenizer=None,
    dtype: str = "float32",
) -> Path:
    """Initialise a model of ``config`` with ``seed`` and save it (and ``tokenizer``)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
