"""Performance benchmarks: each script prints its ratio against a baseline and writes a JSON record."""
