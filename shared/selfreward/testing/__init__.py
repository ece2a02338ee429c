"""Helpers for tests, benchmarks and smoke runs (tiny models, local servers)."""
