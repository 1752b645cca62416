"""moeviz benchmarks: `make bench` (python -m benchmarks) runs every bench_*.py and writes JSON."""


def verdict(ok: bool) -> str:
    """A target's outcome as the JSON results write it."""
    return "PASS" if ok else "MISS"
