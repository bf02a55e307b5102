"""Benchmarks: each compares Cascade against a baseline measured in the same run."""
