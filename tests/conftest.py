from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_cli

pytest_plugins = ["conftest_ssh"]  # real sshd node fixtures


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh HPCBATCH_HOME (with a space in its path, on purpose)."""
    h = tmp_path / "hpc home"
    monkeypatch.setenv("HPCBATCH_HOME", str(h))
    return h


@pytest.fixture
def cli(home):
    def call(*args: str, **kw):
        return run_cli(home, *args, **kw)
    return call
