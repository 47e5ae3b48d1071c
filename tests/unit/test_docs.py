"""Every command and option is documented: in --help, and every command in the README."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from batchgate.cli import main

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(main.commands))
def test_command_has_help_and_is_in_the_readme(name: str) -> None:
    command = main.commands[name]
    assert command.help and len(command.help.strip()) > 20
    assert f"batchgate {name}" in README


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_option_of_run_estimate_and_report_is_explained(name: str) -> None:
    command = main.commands[name]
    for param in command.params:
        if isinstance(param, click.Option) and name in {"run", "estimate", "report", "validate"}:
            documented = bool(param.help) or param.show_default or param.name in {"fmt"}
            assert documented or f"--{param.name.replace('_', '-')}" in README, f"{name} {param.opts}"


def test_readme_exit_codes_match_the_runner() -> None:
    from batchgate.runner import EXIT_CODES

    for code in set(EXIT_CODES.values()) | {4}:
        assert f"| {code} |" in README or f"| {code} /" in README or f"/ {code} |" in README, code
