"""Benchmarks of isearle (see bench/run_all.py); each script also runs alone."""
