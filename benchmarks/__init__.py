"""moeviz benchmarks: `make bench` (python -m benchmarks) runs every bench_*.py and writes JSON."""
