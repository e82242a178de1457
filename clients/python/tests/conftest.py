"""Starts the real `baton serve` binary for the tests (env BATON_BIN, default
../../target/debug/baton from clients/python), on a temporary database and an ephemeral port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
BATON_BIN = os.environ.get("BATON_BIN", str(HERE.parent / ".." / ".." / "target" / "debug" / "baton"))
TOKEN_SECRET = "test-secret-0123456789abcdef0123456789abcdef"

AGENTS = f"""
queue_limit = 2
max_context_bytes = 4096

[agents.default]
kind = "echo"

[agents.slow]
kind = "echo"
delay_ms = 100

[agents.ask]
kind = "command"
program = "{sys.executable}"
args = ["{HERE / 'ask_agent.py'}"]
"""


@dataclass
class Server:
    """One running `baton serve`; `restart` keeps its port and database."""

    directory: Path
    config: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    scheme: str = "http"
    process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = self.directory / "baton.toml"
        config.write_text(self.config)
        deadline = time.monotonic() + 30
        while not Path(BATON_BIN).exists():  # briefly absent while it is being rebuilt
            if time.monotonic() > deadline:
                pytest.fail(f"no baton binary at {BATON_BIN} (set BATON_BIN)")
            time.sleep(0.5)
        self.process = subprocess.Popen(
            [
                BATON_BIN, "serve",
                "--listen", f"127.0.0.1:{self.port}",
                "--database", f"sqlite://{self.directory / 'baton.db'}",
                "--config", str(config),
            ],
            stdout=subprocess.PIPE,
            stderr=open(self.directory / "stderr.log", "a"),
            text=True,
            env={**os.environ, **self.env},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = re.search(r"listening on (https?)://[^:]+:(\d+)", line)
        if match is None:
            self.stop()
            log = (self.directory / "stderr.log").read_text()
            pytest.fail(f"baton did not start: {line!r}\n{log[-3000:]}")
        self.scheme, self.port = match.group(1), int(match.group(2))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def restart(self, sig: int = signal.SIGKILL) -> None:
        self.stop(sig)
        self.start()


def new_key(tenant: str, role: str = "tenant") -> tuple[str, str]:
    """A fresh API key and its SHA-256, from `baton key new`."""
    out = subprocess.run(
        [BATON_BIN, "key", "new", "--tenant", tenant, "--role", role],
        check=True, capture_output=True, text=True,
    ).stdout
    key = re.search(r"^(bk_\S+)$", out, re.M)
    sha = re.search(r'sha256 = "([0-9a-f]+)"', out)
    assert key and sha, out
    return key.group(1), sha.group(1)


@dataclass
class AuthServer:
    server: Server
    keys: dict[str, str]

    @property
    def url(self) -> str:
        return self.server.url


def _serve(tmp: Path, config: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = Server(tmp, config, env or {})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with access control off and the test agents."""
    yield from _serve(tmp_path_factory.mktemp("baton"), AGENTS)


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[Server]:
    """A server of the test's own (to restart it, say)."""
    yield from _serve(tmp_path, AGENTS)


@pytest.fixture(scope="session")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server speaking HTTPS with a self-signed certificate for 127.0.0.1 (`ca.pem`)."""
    tmp = tmp_path_factory.mktemp("baton-tls")
    try:
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "ca.pem"),
            ],
            check=True, capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"openssl cannot make a test certificate: {e}")
    config = f'tls_cert = "{tmp / "ca.pem"}"\ntls_key = "{tmp / "key.pem"}"\n' + AGENTS
    yield from _serve(tmp, config)


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    """A server with access control on: keys `acme`, `other` (tenants), `admin`, `slowpoke`
    (rate_per_s = 1) and `limited` (tenant at max_sessions_per_tenant = 2, once filled)."""
    keys: dict[str, str] = {}
    blocks = []
    for name, tenant, role, extra in [
        ("acme", "acme", "tenant", ""),
        ("other", "other", "tenant", ""),
        ("admin", "ops", "admin", ""),
        ("slowpoke", "slow", "tenant", "rate_per_s = 1\n"),
        ("limited", "limited", "tenant", ""),
    ]:
        key, sha = new_key(tenant, role)
        keys[name] = key
        blocks.append(
            f'[[auth.keys]]\nid = "{name}"\ntenant = "{tenant}"\nrole = "{role}"\n'
            f'sha256 = "{sha}"\n{extra}'
        )
    config = (
        "max_sessions_per_tenant = 3\n"
        + AGENTS
        + '\n[auth]\nmode = "keys"\ntoken_secret_env = ["BATON_TEST_TOKEN_SECRET"]\n\n'
        + "\n".join(blocks)
    )
    for server in _serve(
        tmp_path_factory.mktemp("baton-auth"), config, {"BATON_TEST_TOKEN_SECRET": TOKEN_SECRET}
    ):
        yield AuthServer(server, keys)
