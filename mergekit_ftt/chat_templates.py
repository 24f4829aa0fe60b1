"""Chat templates the project applies itself (the Tülu format of the paper's fine-tuning)."""

from __future__ import annotations

from mergekit_ftt.errors import FttError

# The Tülu chat template (Open-Instruct), with {% generation %} markers around the
# assistant's reply and EOS so that TRL's `assistant_only_loss` can find them.
# Rendering is unchanged by the markers.
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)


def tulu_chat_template(add_bos: bool) -> str:
    """The Tülu template, starting with the BOS token when ``add_bos`` (Open-Instruct's
    ``--add_bos``: chat data is tokenized without special tokens, so the template adds it)."""
    return ("{{ bos_token }}" if add_bos else "") + TULU_CHAT_TEMPLATE


def load_tokenizer(
    model: str, revision: str | None, trust_remote_code: bool, template: str, add_bos: bool
):
    """``model``'s tokenizer with the chat template a run asks for: ``template`` ``tulu``
    always sets the Tülu template; ``auto`` keeps the tokenizer's own, if it has one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model, revision=revision, trust_remote_code=trust_remote_code
    )
    if template == "tulu" or not tokenizer.chat_template:
        if add_bos and tokenizer.bos_token is None:
            raise FttError(
                f"add_bos is true but the tokenizer of {model} has no BOS token; set add_bos: false."
            )
        tokenizer.chat_template = tulu_chat_template(add_bos)
    return tokenizer
