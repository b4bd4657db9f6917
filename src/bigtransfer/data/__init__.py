"""Data: sources, few-shot subsets, transforms, MixUp, and the step-indexed sampler."""
