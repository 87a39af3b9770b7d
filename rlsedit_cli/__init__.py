"""rlsedit: an experiment runner for lifelong knowledge editing of language models."""

__version__ = "0.1.0"
