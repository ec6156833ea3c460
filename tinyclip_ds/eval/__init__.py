"""Retrieval and zero-shot evaluation, exact for any world size and batch size."""
