"""`batchgate cache stats|prune` and `batchgate budget status`, through click as a user calls them."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from batchgate.budget import CapBook, CapSpec
from batchgate.cache import AnswerCache
from batchgate.cli import main


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    with AnswerCache.open(tmp_path / "cache") as cache:
        for i in range(5):
            cache.put(f"{i:032x}", {"status": "ok", "content": "x" * 100, "total_cost_usd": 0.01, "model": "m"})
        cache.flush()
        assert cache.get(f"{0:032x}") is not None
    return tmp_path / "cache"


def test_cache_stats_text_and_json(cache_dir: Path) -> None:
    code, out, err = invoke("cache", "stats", str(cache_dir))
    assert code == 0, err
    assert "answers   5 (" in out and "hits      1, saved $0.01" in out and "$0.05 when bought" in out
    code, out, _ = invoke("cache", "stats", str(cache_dir), "--json")
    doc = orjson.loads(out)
    assert code == 0 and doc["entries"] == 5 and doc["hits"] == 1 and doc["saved_usd"] == pytest.approx(0.01)


def test_cache_stats_of_a_directory_without_a_cache_is_a_usage_error(tmp_path: Path) -> None:
    code, out, err = invoke("cache", "stats", str(tmp_path))
    assert code == 2 and out == ""
    assert "no answer cache here" in err and "Traceback" not in err
    assert not (tmp_path / "answers.sqlite3").exists()  # looking does not create one


def test_cache_prune(cache_dir: Path) -> None:
    code, _, err = invoke("cache", "prune", str(cache_dir))
    assert code == 2 and "--older-than" in err
    per_answer = orjson.loads(invoke("cache", "stats", str(cache_dir), "--json")[1])["answers_bytes"] / 5
    fits_three = f"{3.5 * per_answer / 1048576:.6f}"
    code, out, err = invoke("cache", "prune", str(cache_dir), "--older-than", "30", "--max-size", fits_three)
    assert code == 0, err
    assert out.startswith("removed 2 answers; 3 left")
    code, out, _ = invoke("cache", "prune", str(cache_dir), "--older-than", "0")
    assert code == 0 and out.startswith("removed 3 answers; 0 left")
    code, _, err = invoke("cache", "prune", str(cache_dir), "--max-size", "-1")
    assert code == 2


def test_budget_status(tmp_path: Path) -> None:
    out_dir, shared = tmp_path / "out", tmp_path / "budget.jsonl"
    with CapBook.open(CapSpec(max_total_cost_usd=2, daily_cap_usd=1), out_dir, shared) as book:
        r = book.try_reserve(0.5)
        assert r is not None
        book.settle(r, 0.25)
        code, out, err = invoke("budget", "status", "--out", str(out_dir), "--budget-file", str(shared))
        assert code == 0, err
        assert "held by running runs" in out  # the lease of this live process
    code, out, err = invoke("budget", "status", "--out", str(out_dir), "--budget-file", str(shared))
    assert code == 0, err
    assert str(out_dir / "spend.jsonl") in out and str(shared) in out
    assert "today" in out and "this month" in out and "resets" in out and "$0.25 used" in out
    assert "held by" not in out
    code, out, _ = invoke("budget", "status", "--budget-file", str(shared), "--json")
    doc = orjson.loads(out)
    daily = next(s for s in doc["scopes"] if s["scope"] == "daily")
    assert daily["used_usd"] == pytest.approx(0.25) and daily["resets_at"].endswith("T00:00Z")


def test_budget_status_needs_a_place_and_refuses_symlinks(tmp_path: Path) -> None:
    code, _, err = invoke("budget", "status")
    assert code == 2 and "--out DIR" in err
    (tmp_path / "real").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, _, err = invoke("budget", "status", "--budget-file", str(tmp_path / "link"))
    assert code == 2 and "symbolic link" in err and "Traceback" not in err
    code, out, _ = invoke("budget", "status", "--out", str(tmp_path / "none"))
    assert code == 0 and "no spend recorded yet" in out


@pytest.mark.parametrize("args", [["cache", "stats"], ["cache", "prune"], ["budget", "status"], ["cache"], ["budget"]])
def test_every_money_command_has_help(args: list[str]) -> None:
    code, out, _ = invoke(*args, "--help")
    assert code == 0 and len(out) > 100
    group = main.commands[args[0]]
    assert group.help and len(group.help) > 20
