"""Regression benchmarks for CI (``adapter bench``): suites, timing in rotating blocks,
history, comparisons and their statistics. Builds engines through adapter.converter."""
