"""Benchmarks: `python3 build.py bench NAME [--json PATH]`, one module per NAME in this package."""
