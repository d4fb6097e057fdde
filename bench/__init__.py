"""Benchmark of the nightly path against a bare-DuckDB floor (`make bench`, `python -m bench.run`)."""
