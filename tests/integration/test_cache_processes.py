"""Several real processes writing and reading one answer cache at once: no error, no lost or mixed answer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from batchgate.cache import AnswerCache

WORKER = """
import random, sys
from pathlib import Path
from batchgate.cache import AnswerCache

directory, seed = Path(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
keys = list(range(seed * 150, seed * 150 + 400))  # neighbours overlap by 250 keys
rng.shuffle(keys)
with AnswerCache.open(directory) as cache:
    for n, i in enumerate(keys):
        probe = cache.get(f"{rng.randrange(1000):032x}")
        assert probe is None or probe["content"].endswith(f"-{int(probe['request_id'])}"), probe
        answer = {"status": "ok", "content": f"{seed}-{i}", "request_id": str(i), "total_cost_usd": 0.001}
        cache.put(f"{i:032x}", answer)
        if n % 25 == 0:
            cache.flush()
    cache.flush()
    for i in keys:
        entry = cache.get(f"{i:032x}")
        assert entry is not None and entry["content"].endswith(f"-{i}"), (i, entry)
print("ok")
"""


def test_four_writers_share_one_cache(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path / "c"), str(seed)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for seed in range(4)
    ]  # fmt: skip
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in results]
    with AnswerCache.open(tmp_path / "c") as cache:
        stats = cache.stats()
        assert stats.entries == 3 * 150 + 400  # the union of the four key ranges, each answer once
        assert stats.hits >= 1600  # every worker read back all its keys
        for i in range(0, 850, 7):
            entry = cache.get(f"{i:032x}")
            assert entry is not None
            writer, key = entry["content"].split("-")
            assert int(key) == i and int(writer) * 150 <= i < int(writer) * 150 + 400
