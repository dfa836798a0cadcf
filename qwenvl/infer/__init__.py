"""Inference with the native models: prompt encoding, compiled greedy/sampled generation, answer parsing."""
