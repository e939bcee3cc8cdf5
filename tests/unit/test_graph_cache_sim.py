"""benchmarks/graph_cache_sim.py drives the real GraphedForward rules: a cache large enough for the
traffic evicts nothing and runs every token from a graph; a tiny one evicts and runs some eagerly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def table(max_graphs: int) -> dict[str, tuple[int, int, int, float]]:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "graph_cache_sim.py"), "--max-graphs", str(max_graphs)],
                            capture_output=True, text=True, timeout=120, check=True)
    rows = re.findall(r"^\| (base|mixed adapters) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+)% \|$", result.stdout, re.M)
    return {name: (int(buckets), int(captures), int(evictions), float(eager)) for name, buckets, captures, evictions, eager in rows}


def test_a_large_cache_replays_everything_and_a_tiny_one_does_not():
    large, tiny = table(256), table(2)
    assert set(large) == set(tiny) == {"base", "mixed adapters"}
    for buckets, captures, evictions, eager in large.values():
        # Each instance captures each bucket it meets once: at least one capture per bucket.
        assert (evictions, eager) == (0, 0.0) and captures >= buckets > 5
    for buckets, captures, evictions, eager in tiny.values():
        assert buckets > 2 and evictions > 0 and eager > 0.0
