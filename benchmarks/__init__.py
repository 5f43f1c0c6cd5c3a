"""Benchmark support: reference posteriors (:mod:`benchmarks.models`) and accuracy metrics
(:mod:`benchmarks.metrics`)."""
