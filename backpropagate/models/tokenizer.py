"""The demo models' tokenizer: byte-level BPE trained on the bundled corpus, with a ChatML template.

``load_tokenizer(path)`` is how the rest of the code loads any tokenizer, so that a demo folder
always yields exactly the ids it was trained with.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

BOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# ChatML. The assistant's content and its closing <|im_end|> sit inside {% generation %} so that
# `return_assistant_tokens_mask=True` marks them: the model is taught to produce the end token
# and therefore to stop. The newline after <|im_end|> is outside: it is never generated.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 3072) -> Any:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts`` (about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2 style: split on the GPT-2 regex, map bytes to printable characters; no normalizer,
    # so any text (any script, emoji, odd whitespace) decodes back byte for byte.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tok: Any) -> Any:
    """Wrap a trained ``tokenizers.Tokenizer`` as a transformers fast tokenizer with the template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(path: str | Path, **kwargs: Any) -> Any:
    """Load the tokenizer of a model folder or hub id.

    A folder saved as a plain fast tokenizer (the demo models) is loaded with
    ``PreTrainedTokenizerFast``: ``AutoTokenizer`` would pick the class from the model type
    (e.g. Qwen2's) and add tokens the model never saw. Anything else goes through ``AutoTokenizer``.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(path) / "tokenizer_config.json"
    if config.is_file():
        try:
            cls = json.loads(config.read_text()).get("tokenizer_class")
        except (OSError, ValueError):
            cls = None
        if cls in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            return PreTrainedTokenizerFast.from_pretrained(str(path), **kwargs)
    return AutoTokenizer.from_pretrained(str(path), **kwargs)
