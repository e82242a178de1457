"""The examples under examples/python run as their README says, against a real server."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import AGENTS, TOKEN_SECRET, Server, _serve, new_key

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "python"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    key, sha = new_key("shop")
    config = (
        AGENTS
        + '\n[auth]\nmode = "keys"\ntoken_secret_env = ["BATON_TEST_TOKEN_SECRET"]\n\n'
        + f'[[auth.keys]]\nid = "shop"\ntenant = "shop"\nsha256 = "{sha}"\n'
    )
    for server in _serve(tmp_path, config, {"BATON_TEST_TOKEN_SECRET": TOKEN_SECRET}):
        yield server, key


def test_the_backend_example_mints_a_token_and_streams_the_reply(
    keyed: tuple[Server, str], capsys: pytest.CaptureFixture[str]
) -> None:
    server, key = keyed
    backend = load("backend")
    assert backend.main(server.url, key) == 0
    out = capsys.readouterr().out
    assert "browser token for support-42 (write, until " in out, out
    assert "hello from the backend" in out, out
    # Again on the same session: only the new reply is streamed.
    assert backend.main(server.url, key) == 0
    second = capsys.readouterr().out
    assert second.count("hello from the backend") == 1, second


def test_the_backend_example_runs_without_access_control(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    assert load("backend").main(server.url, None, "backend-open") == 0
    out = capsys.readouterr().out
    assert "browser token" not in out and "hello from the backend" in out, out
