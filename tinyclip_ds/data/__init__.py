"""Data: the readers of each spec (the digits demo's included), decoding, the mixture of a stage's
sources, its global order and sampler, datasets and transforms."""
