"""Text tokenizers: texts in, fixed-length token-id tensors out.

`ClipTokenizer` is OpenAI CLIP's byte-level BPE (the vocabulary bundled with open_clip, so no
download); `HfClipTokenizer` reads a Hugging Face CLIP tokenizer from a local directory. Both
return ``(B, context_length)`` int64 ids with the end-of-text token kept when a text is
truncated, and both pickle (DataLoader workers get a copy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import Tensor


class Tokenizer(Protocol):
    """What the rest of the code needs from a tokenizer."""

    context_length: int
    vocab_size: int

    def __call__(self, texts: list[str]) -> Tensor: ...


class ClipTokenizer:
    """OpenAI CLIP's BPE tokenizer (open_clip's ``SimpleTokenizer``): lower-cased, padded with 0."""

    def __init__(self, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer

        self._tokenizer = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.vocab_size = self._tokenizer.vocab_size

    def __call__(self, texts: list[str]) -> Tensor:
        """Token ids (B, context_length): start token, text, end token, then zeros."""
        return self._tokenizer(as_list(texts), context_length=self.context_length)


class HfClipTokenizer:
    """A transformers ``CLIPTokenizer`` read from local files (vocab.json + merges.txt or
    tokenizer.json), padded with its pad token to ``context_length``."""

    def __init__(self, directory: str | Path, context_length: int):
        from transformers import CLIPTokenizer

        directory = Path(directory)
        if not ((directory / "tokenizer.json").is_file()
                or (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()):
            raise FileNotFoundError(
                f"{directory} has no CLIP tokenizer files (tokenizer.json, or vocab.json + "
                f"merges.txt); save the tokenizer or processor there with save_pretrained")
        self._tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
        self.context_length = context_length
        self.vocab_size = len(self._tokenizer)

    def __call__(self, texts: list[str]) -> Tensor:
        """Token ids (B, context_length); truncation keeps the start and end tokens."""
        return self._tokenizer(as_list(texts), padding="max_length", truncation=True,
                               max_length=self.context_length, return_tensors="pt")["input_ids"]


def as_list(texts: list[str] | str) -> list[str]:
    """A batch of texts; a lone string is a batch of one (not a sequence of characters)."""
    return [texts] if isinstance(texts, str) else list(texts)
