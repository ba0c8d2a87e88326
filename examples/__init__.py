"""Runnable examples: a model, a dataset loader and a library call of one's own (see README.md)."""
