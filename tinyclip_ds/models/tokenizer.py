"""Text tokenizers: texts in, fixed-length token-id tensors out.

`ClipTokenizer` is OpenAI CLIP's byte-level BPE (the vocabulary bundled with open_clip, so no
download); `HfClipTokenizer` reads a Hugging Face CLIP tokenizer from a local directory;
`WordTokenizer` splits into words of a fixed vocabulary (the digits demo teacher's). All return
``(B, context_length)`` int64 ids with the end-of-text token kept when a text is truncated, and
all pickle (DataLoader workers get a copy).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

import torch
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


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary.

    Ids: 0 pad, 1 start, 2 end-of-text, 3 unknown, then the words of ``vocabulary`` in its
    order. Text is lowercased and every run of characters other than a-z and 0-9 separates
    words. A call returns ``[start, words…, eot, pad…]`` per text, truncated to keep the eot.
    """

    pad_token_id = 0
    start_token_id = 1
    eot_token_id = 2
    unknown_token_id = 3
    SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")

    def __init__(self, vocabulary: list[str], context_length: int):
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), "
                             f"got {context_length}")
        # A word that splitting never produces could never be looked up: a typo in the vocabulary.
        unsplittable = [word for word in vocabulary if split_words(word) != [word]]
        if unsplittable:
            raise ValueError(f"vocabulary words must be lowercase a-z/0-9 runs; got {unsplittable}")
        repeated = sorted({word for word in vocabulary if vocabulary.count(word) > 1})
        if repeated:
            raise ValueError(f"vocabulary lists {repeated} more than once")
        self.context_length = context_length
        self.vocab = [*self.SPECIAL_TOKENS, *vocabulary]
        self.ids = {word: i for i, word in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Ids of the words of one text, without start, end or padding."""
        return [self.ids.get(word, self.unknown_token_id) for word in split_words(text)]

    def __call__(self, texts: list[str]) -> Tensor:
        """Token ids ``(len(texts), context_length)``: start, words, eot, then zero padding."""
        texts = as_list(texts)
        out = torch.full((len(texts), self.context_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)[:self.context_length - 2]
            tokens = [self.start_token_id, *ids, self.eot_token_id]
            out[row, :len(tokens)] = torch.tensor(tokens)
        return out


def split_words(text: str) -> list[str]:
    """The words `WordTokenizer` sees: lowercased runs of a-z and 0-9."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def as_list(texts: list[str] | str) -> list[str]:
    """A batch of texts; a lone string is a batch of one (not a sequence of characters)."""
    return [texts] if isinstance(texts, str) else list(texts)
