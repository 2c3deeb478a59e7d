"""Runnable studies and benchmarks; each module has one entry point."""
