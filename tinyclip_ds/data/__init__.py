"""Data sources, transforms, tokenizers and the digits demo."""
