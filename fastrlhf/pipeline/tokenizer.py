"""Tokenizers: the built-in character tokenizer of the embedded task, and loading local ones.

Both are Hugging Face fast tokenizers, so a model trained on the embedded task saves and loads
like any local model. :class:`Codec` is the one place prompts and completions become token ids.
"""

from __future__ import annotations

import os

from fastrlhf.pipeline.errors import PipelineError
from fastrlhf.pipeline.sources import source_kwargs

PAD, BOS, EOS, SEP = "<pad>", "<bos>", "<eos>", ">"


def build_char_tokenizer(alphabet: str):
    """A character-level tokenizer: ``<pad> <bos> <eos> >`` then one token per letter.

    Encoding a text prepends ``<bos>`` (like most causal-LM tokenizers); decoding joins the
    characters back without spaces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, SEP, *alphabet])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                        special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD)


VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
               "sentencepiece.bpe.model", "tiktoken.model")
"""Files that hold a tokenizer's vocabulary (one of them must be there)."""


def load_tokenizer(path: str):
    """The tokenizer saved in the local model directory ``path``, or in its GGUF file (never
    fetched from a hub)."""
    from transformers import AutoTokenizer

    directory, kw = source_kwargs(path)
    if "gguf_file" not in kw and not any(os.path.isfile(os.path.join(directory, f)) for f in VOCAB_FILES):
        raise PipelineError(f"no tokenizer found in {path!r} (none of {', '.join(VOCAB_FILES)}): save the "
                            "model's tokenizer there with tokenizer.save_pretrained(PATH)")
    try:
        return AutoTokenizer.from_pretrained(directory, **kw)
    except Exception as e:  # noqa: BLE001
        raise PipelineError(f"cannot load a tokenizer from {path!r}: {str(e).splitlines()[0]}") from None


class Codec:
    """Turns prompt and completion texts into token ids, and completions back into text.

    Args:
        tokenizer: a Hugging Face tokenizer.
        pad_token: the token to pad with when the tokenizer has none (e.g. its eos token).
        add_eos: end every completion with the eos token (off for the fixed-length embedded task).
        source: where the tokenizer came from, for error messages.
        chat_template: each prompt becomes a user message in the tokenizer's chat template,
            followed by the assistant's turn (for instruction-tuned models).
    """

    def __init__(self, tokenizer, *, pad_token: str | None = None, add_eos: bool = True, source: str = "",
                 chat_template: bool = False):
        self.tokenizer, self.chat_template = tokenizer, chat_template
        where = f" of {source}" if source else ""
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise PipelineError(f"data.chat_template is set but the tokenizer{where} has no chat template")
        if pad_token is not None:
            pad_id = tokenizer.convert_tokens_to_ids(pad_token)
            if pad_id is None or (pad_id == tokenizer.unk_token_id and pad_token != tokenizer.unk_token):
                raise PipelineError(f"model.pad_token {pad_token!r} is not in the vocabulary of the tokenizer{where}")
            tokenizer.pad_token = pad_token
        if tokenizer.pad_token_id is None:
            eos = tokenizer.eos_token
            hint = f" (e.g. --pad-token {eos!r}, its eos token)" if eos else ""
            raise PipelineError(f"the tokenizer{where} has no pad token: pass --pad-token TOKEN or set "
                                f"model.pad_token{hint}")
        if add_eos and tokenizer.eos_token_id is None:
            raise PipelineError(f"the tokenizer{where} has no eos token, so completions cannot end")
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_id = int(tokenizer.eos_token_id) if add_eos else None
        self.add_eos = add_eos

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def prompt(self, text: str) -> list[int]:
        """Prompt ids, with the tokenizer's special tokens (e.g. a leading bos), or the chat
        template's (the template holds them)."""
        if self.chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=not self.chat_template)["input_ids"])

    def completion(self, text: str) -> list[int]:
        """Completion ids, no special tokens, then eos when ``add_eos``."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids + [self.eos_id] if self.add_eos else ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_ids(self, chars: str) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids(c) for c in chars]
