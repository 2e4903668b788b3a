"""Benchmarks: each script prints its figures; nothing here is a test."""
