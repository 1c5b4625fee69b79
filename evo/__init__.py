"""evo: evolutionary model merging and continual adaptation of language models on Ray."""

__version__ = "0.1.0"
