"""Benchmark harness: a deterministic image corpus and a local static server for it."""
