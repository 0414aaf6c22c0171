"""Evaluation: accuracy-vs-length curves for the state-tracking tasks (``accuracy``) and the
language-model evaluations (per-position loss, perplexity, effective state rank) in the other
modules of this package. Import the submodule you need; nothing is imported here."""
