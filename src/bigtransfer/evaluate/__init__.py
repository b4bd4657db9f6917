"""Evaluation: classification metrics and the paper's protocols."""
