"""bench.py's benchmarks, one module each, and what they share: running the scripts and publishing the tables."""
