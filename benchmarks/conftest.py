"""pytest-benchmark suite: ``pytest -n 0 benchmarks/ --benchmark-enable`` (pytest-benchmark's
JSON and ``compare`` work on it: add ``--benchmark-json=build/peers-bench.json``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
