"""Where the API key comes from, and what a run file may say about the config."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchgate.config import RunConfig, load_api_key, public_settings
from batchgate.errors import InputError


def test_key_file_with_bom_and_newline_is_read_and_a_shared_one_warns(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_bytes(b"\xef\xbb\xbfgp-secret \r\n\n")
    f.chmod(0o644)
    warnings: list[str] = []
    assert load_api_key(f, warn=warnings) == "gp-secret"
    assert warnings and "chmod 600" in warnings[0] and "gp-secret" not in warnings[0]
    f.chmod(0o600)
    warnings.clear()
    assert load_api_key(f, warn=warnings) == "gp-secret" and not warnings


def test_key_file_with_two_keys_is_refused_without_echoing_them(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_text("gp-one\ngp-two\n")
    with pytest.raises(InputError) as err:
        load_api_key(f)
    assert "2 non-empty lines" in str(err.value) and "gp-one" not in str(err.value)


def test_public_settings_never_hold_the_key(tmp_path: Path) -> None:
    cfg = RunConfig(out_dir=tmp_path, api_key="gp-very-secret")
    settings = public_settings(cfg)
    assert "api_key" not in settings and "gp-very-secret" not in repr(settings)
    assert settings["out_dir"] == str(tmp_path) and settings["default_max_tokens"] == 4096
    assert "gp-very-secret" not in repr(cfg)
