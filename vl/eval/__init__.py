"""Evaluation: chunked zero-shot retrieval, the probes, and the evaluation tasks of `evaluate.py task=...`."""
