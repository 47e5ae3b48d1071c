"""Module layering: pure modules stay pure, only the CLI prints, the simulator stays independent."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import batchgate

PACKAGE = Path(batchgate.__file__).parent
HEAVY = {"asyncio", "aiohttp", "pandas", "pyarrow", "click", "matplotlib", "rich"}


def imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: batchgate's own modules
                found.add("." + (node.module or "").split(".")[0])
            elif node.module:
                found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("module", ["errors", "models", "sse", "pricing", "jobs", "config", "jobfile", "ledger"])
def test_pure_modules_import_no_io_frameworks(module: str) -> None:
    assert not imports(module) & HEAVY


#: The command-line layer: the only modules that may import click and print.
CLI_MODULES = {"cli", "cli_display", "__main__"}


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in CLI_MODULES))
def test_only_the_cli_imports_click_and_nothing_imports_the_cli(module: str) -> None:
    found = imports(module)
    assert "click" not in found
    assert not found & {".cli", ".cli_display"}


def test_the_display_never_imports_the_command_module() -> None:
    assert ".cli" not in imports("cli_display")


def test_simulator_never_imports_the_client_side() -> None:
    assert not imports("simulator") & {".client", ".retry", ".runner", ".throttle", ".ledger"}


def test_runner_never_imports_reports() -> None:
    assert ".reports" not in imports("runner")


def test_exported_names_are_sorted_and_exist() -> None:
    assert batchgate.__all__ == sorted(batchgate.__all__, key=lambda n: (not n.isupper(), n))
    for name in batchgate.__all__:
        assert hasattr(batchgate, name), name


def test_report_numbers_do_not_import_the_plotting_library() -> None:
    assert "matplotlib" not in imports("reports")
    assert "matplotlib" in imports("report_page")
