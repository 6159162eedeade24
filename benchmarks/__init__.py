"""Benchmarks for synthmill; each module runs as ``python -m benchmarks.NAME`` (see RESULTS.md)."""
