"""tinyclip-ds: distil a large CLIP into small, fast CLIP students with DeepSpeed."""

__version__ = "0.1.0"
