"""Hermetic test setup: built-in plugins only, caches in a temp folder, few threads."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ["PAGCTL_DISABLE_PLUGIN_AUTOLOAD"] = "1"


@pytest.fixture(autouse=True)
def _hermetic(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGCTL_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("PAGCTL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a temp folder so default run folders (runs/<name>) never land in the repo."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is fastest, and two contend badly on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def sigint_default() -> Iterator[None]:
    """Ctrl-C tests need Python's own SIGINT handler, however the suite was started
    (``nohup make test &`` or a CI runner may start it with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class CliResult:
    """What one ``pagctl`` call gave: its exit code, stdout, stderr, and both together."""

    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr
        self.output = stdout + stderr


@pytest.fixture
def pagctl(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """``pagctl(*argv) -> CliResult``: the console entry point, in this process."""
    from pagctl import cli

    def run(*argv: object) -> CliResult:
        capsys.readouterr()
        code = 0
        try:
            cli.main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


def envelope_records(stdout: str, kind: str) -> list[dict[str, Any]]:
    """The records of a command's ``--format json`` stdout, once it is checked to be the
    envelope (docs/cli.md, "JSON output"): exactly the keys kind, schema_version,
    pagctl_version and records, ``kind`` the command as typed, schema_version 1, this
    pagctl's version, records a list of objects; indented, one trailing newline."""
    from pagctl import __version__

    assert stdout.endswith("}\n") and not stdout.endswith("\n\n"), stdout[-200:]
    data = json.loads(stdout)
    assert isinstance(data, dict), type(data)
    assert set(data) == {"kind", "schema_version", "pagctl_version", "records"}, sorted(data)
    assert data["kind"] == kind and data["schema_version"] == 1, (data["kind"], kind)
    assert data["pagctl_version"] == __version__
    assert stdout.startswith('{\n  "kind": ')  # indented, keys sorted
    records = data["records"]
    assert isinstance(records, list) and all(isinstance(r, dict) for r in records), records
    return records
