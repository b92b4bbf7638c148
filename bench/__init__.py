"""Benchmarks: lit_align vs TRL (see docs/benchmarks.md)."""
