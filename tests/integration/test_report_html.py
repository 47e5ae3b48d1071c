"""report.html: self-contained, holds the headline figures and every chart, and draws in a real browser.

The browser is Debian's ``chromium`` run headless with networking off; a probe script injected into a
copy of the page records each chart's box and any script error, and the screenshot proves the boxes
hold drawn pixels.  Without chromium the browser test skips, unless ``CI`` is set: then it fails.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchgate.reports import ReportResult, build_reports

CHARTS = ("cost-by-model", "spend-over-time", "latency", "failures", "cost-by-day")
SVG_NAMESPACES = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}


def ledger_rows(rnd: random.Random, n: int, run_id: str, start: datetime, id_prefix: str) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        failed = rnd.random() < 0.08
        causes = [
            rnd.choice(["rate_limited", "server_error", "stream_interrupted"]) for _ in range(rnd.choice([0, 0, 1]))
        ]
        causes += ["timeout"] if failed else []
        model = rnd.choice(["Qwen/Qwen3-32B-FP8", "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8"])
        p, c = rnd.randint(20, 800), rnd.randint(1, 600)
        cost = 0.0 if failed else (p * 1e-7 + c * 3e-7) * 1.1
        cut = rnd.randint(5, 50) if "stream_interrupted" in causes else 0
        rows.append(
            {
                "v": 1,
                "id": f"{id_prefix}{i}",
                "job": rnd.choice(["nightly", "triage"]),
                "run_id": run_id,
                "model": model,
                "status": "failed" if failed else "ok",
                "content": "" if failed else "an answer " * 20,
                "finish_reason": None if failed else "stop",
                "prompt_tokens": None if failed else p,
                "completion_tokens": None if failed else c,
                "total_tokens": None if failed else p + c,
                "base_cost_usd": cost / 1.1,
                "platform_fee_usd": cost - cost / 1.1,
                "total_cost_usd": cost,
                "unconfirmed_completion_tokens": cut,
                "unconfirmed_cost_usd": None if cut and i % 2 else cut * 3.3e-7,
                "attempts": 1 + len(causes),
                "retry_causes": causes,
                "started_at": (start + timedelta(seconds=i * 0.5)).isoformat().replace("+00:00", "Z"),
                "ttft_s": None if failed else round(rnd.lognormvariate(-1.3, 0.4), 6),
                "latency_s": round(rnd.lognormvariate(0.5, 0.5), 6),
                "error": {"type": "timeout", "status": None, "message": "idle"} if failed else None,
            }
        )
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ReportResult]:
    """Two nightly runs on two days, rendered once for every test here."""
    root = tmp_path_factory.mktemp("report")
    rnd = random.Random(5)
    for day, run_id in ((1, "night-1"), (2, "night-2")):
        run_dir = root / "runs" / f"2025-03-0{day}"
        run_dir.mkdir(parents=True)
        rows = ledger_rows(rnd, 1500, run_id, datetime(2025, 3, day, 1, 0, tzinfo=UTC), f"d{day}-")
        (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = build_reports([root / "runs"], root / "out", formats=("html",))
    return root / "out" / "report.html", result


def test_page_holds_the_headline_figures_and_every_chart(report: tuple[Path, ReportResult]) -> None:
    page, result = report
    text = page.read_text(encoding="utf-8")
    t = result.totals
    assert f"${t['total_cost_usd']:,.6f}" in text
    assert f"${t['unconfirmed_cost_usd']:,.6f}" in text
    assert "incl. estimate" in text  # half the cut streams were priced by the report
    assert f"{int(t['ok']):,} ok" in text
    assert f"{int(t['failed']):,} failed" in text
    assert f"{int(t['total_tokens']):,}" in text
    assert t["wall_s"] > 0 and "Wall time" in text
    assert len(re.findall(r"<svg\b", text)) == len(CHARTS)
    for name in CHARTS:
        assert f'id="chart-{name}"' in text
    assert page.stat().st_size < 5_000_000


def test_page_is_self_contained(report: tuple[Path, ReportResult]) -> None:
    text = report[0].read_text(encoding="utf-8")
    urls = set(re.findall(r"""https?://[^\s"'<>)]+""", text))
    assert urls <= SVG_NAMESPACES, urls - SVG_NAMESPACES
    assert not re.search(r"""\ssrc\s*=""", text)  # nothing loaded, not even a local file
    links = re.findall(r"""(?:\s|xlink:)href\s*=\s*["']([^"']*)""", text)
    assert all(link.startswith("#") for link in links)  # the charts reference nothing; anything else is in-page
    assert not re.search(r"url\(\s*['\"]?(?:https?:)?//", text)
    assert "<script" not in text and "<link" not in text and "@import" not in text
    assert "<!DOCTYPE svg" not in text  # the SVG prolog names an external DTD: stripped


def _chromium() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is missing on CI; .ci/run installs it (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")


# Runs before the page: records script errors.  Runs after it: records each chart's box and every
# resource the page fetched (failed loads included; chromium does not log those to the console).
_PROBE_HEAD = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
console.error = (...a) => window.__errors.push(a.join(' '));
</script>"""
_PROBE_TAIL = """<script>
const boxes = [...document.querySelectorAll('figure.chart')].map(f => {
  const svg = f.querySelector('svg'); const r = svg ? svg.getBoundingClientRect() : {x: 0, y: 0, width: 0, height: 0};
  return {id: f.id, x: r.x + scrollX, y: r.y + scrollY, w: r.width, h: r.height,
          marks: svg ? svg.querySelectorAll('path, use, rect, text').length : 0};
});
const fetched = performance.getEntriesByType('resource').map(e => e.name);
document.body.setAttribute('data-probe', JSON.stringify({boxes, errors: window.__errors, fetched}));
console.log('batchgate-probe ' + boxes.length);
</script>"""


def test_every_chart_draws_in_headless_chromium(report: tuple[Path, ReportResult], tmp_path: Path) -> None:
    chromium = _chromium()
    page = report[0].read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + _PROBE_HEAD, 1).replace("</body>", _PROBE_TAIL + "</body>", 1))
    shot = tmp_path / "page.png"
    width, height = 1200, 3200
    done = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--no-first-run",
            "--proxy-server=127.0.0.1:9",  # anything that still tried the network would fail loudly
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--window-size={width},{height}",
            f"--screenshot={shot}",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # Every console line must be the probe's own: no failed resource load, no uncaught error.
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert any("batchgate-probe" in line for line in console), done.stderr[-2000:]
    assert [line for line in console if "batchgate-probe" not in line] == []

    found = re.search(r"data-probe=\"([^\"]*)\"", done.stdout)
    assert found, done.stdout[:2000]
    probe_data = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert probe_data["errors"] == []
    assert probe_data["fetched"] == []  # the page loads nothing: no font, image or stylesheet
    boxes = probe_data["boxes"]
    assert [b["id"] for b in boxes] == [f"chart-{name}" for name in CHARTS]

    image = _read_png(shot)
    assert image.shape[:2] == (height, width)
    for box in boxes:
        assert box["w"] > 300 and box["h"] > 150, box
        assert box["marks"] > 10, box
        assert box["y"] + box["h"] <= height, box  # inside the screenshot
        x, y = int(box["x"]), int(box["y"])
        region = image[y : y + int(box["h"]), x : x + int(box["w"]), :3]
        ink = (region < 0.85).any(axis=-1).mean()  # share of pixels that are not background white
        assert ink > 0.02, (box["id"], ink)


def _read_png(path: Path) -> np.ndarray:
    """RGB(A) floats in [0, 1], as the ink measure above expects."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA"), dtype=np.float64) / 255.0
