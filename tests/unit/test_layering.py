"""Module layering: pure modules stay pure, only the CLI prints, the simulator stays independent."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import batchgate

PACKAGE = Path(batchgate.__file__).parent
HEAVY = {"asyncio", "aiohttp", "pandas", "pyarrow", "click", "matplotlib", "rich"}


def _source(module: str) -> Path:
    """``reports.page`` -> batchgate/reports/page.py; ``reports`` -> batchgate/reports/__init__.py."""
    path = PACKAGE.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports(module: str) -> set[str]:
    tree = ast.parse(_source(module).read_text())
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


PURE = [
    "errors", "models", "sse", "pricing", "jobs", "config", "jobfile", "ledger", "usage", "fingerprint",
    "accounting", "rows", "structured", "resume", "budget", "cache", "status",
]  # fmt: skip


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_io_frameworks(module: str) -> None:
    assert not imports(module) & HEAVY


#: The command-line layer: the only modules that may import click and print.
CLI_MODULES = {"cli", "cli_display", "__main__"}
ALL_MODULES = sorted(
    ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__") for p in PACKAGE.rglob("*.py")
)


@pytest.mark.parametrize("module", [m for m in ALL_MODULES if m not in CLI_MODULES])
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


# The reports package, lowest layer first: a module imports only modules before it.
REPORT_LAYERS = ["data", "load", "summary", "formats", "text", "charts", "page", "build"]


def relative_imports(module: str) -> set[str]:
    """Sibling modules a package module imports (``from .x import``, ``from . import x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(_source(module).read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("layer", REPORT_LAYERS)
def test_report_modules_never_import_upwards(layer: str) -> None:
    below = set(REPORT_LAYERS[: REPORT_LAYERS.index(layer)])
    assert relative_imports(f"reports.{layer}") <= below


def test_report_package_has_exactly_the_layered_modules() -> None:
    assert {m.removeprefix("reports.") for m in ALL_MODULES if m.startswith("reports.")} == set(REPORT_LAYERS)


def test_report_numbers_do_not_import_the_plotting_library() -> None:
    for module in REPORT_LAYERS:
        assert "matplotlib" not in imports(f"reports.{module}"), module
    # The charts are plain string building: the standard library and the report's own numbers only.
    assert imports("reports.charts") <= {"__future__", "html", "math", "re", "collections", "datetime", "typing",
                                         ".data"}  # fmt: skip
    for module in ("data", "text", "charts", "page"):  # renderers see numbers, not the engine
        assert "duckdb" not in imports(f"reports.{module}"), module


@pytest.mark.parametrize("module", ALL_MODULES)
def test_no_module_imports_another_modules_private_names(module: str) -> None:
    """``from .x import _name`` couples to what ``x`` keeps free to change; public names only."""
    for node in ast.walk(ast.parse(_source(module).read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("batchgate")):
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            assert not private, f"{module} imports {private} from {node.module or '.'}"
            parts = (node.module or "").split(".")
            assert not any(p.startswith("_") and not p.startswith("__") for p in parts), (module, node.module)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("batchgate"):
                    assert not any(p.startswith("_") for p in alias.name.split(".")), (module, alias.name)


def test_importing_batchgate_and_its_reports_loads_no_heavy_library() -> None:
    """``import batchgate`` and ``run --no-report`` stay light: DuckDB, pandas and pyarrow load when used."""
    code = (
        "import sys, batchgate, batchgate.reports, batchgate.cli; "
        "print(sorted(m for m in ('duckdb', 'pandas', 'pyarrow', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_cli_loads_the_engine_only_for_the_commands_that_send() -> None:
    """`batchgate report`, `status`, `-V` and shell completion start without aiohttp, numpy or the runner."""
    code = (
        "import sys, batchgate, batchgate.cli; "
        "print(sorted(m for m in ('aiohttp', 'numpy', 'batchgate.runner', 'batchgate.client') if m in sys.modules)); "
        "batchgate.Runner; print('batchgate.runner' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "True"]  # and `batchgate.Runner` still works, on first use
