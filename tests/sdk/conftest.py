"""Starts simulated replicas and tollgate once per session and hands out SDK clients.

The binary comes from TOLLGATE_BIN. Every listener binds 127.0.0.1:0; the chosen ports are
read from the processes' ready lines, with a timeout, so nothing waits on a fixed sleep.
"""

import hashlib
import os
import queue
import subprocess
import threading
from pathlib import Path

import anthropic
import openai
import pytest

# Secrets the SDK sends; the config stores only their SHA-256.
KEY = "tg-sdk-key-team-a"
NARROW_KEY = "tg-sdk-key-team-b"
# rpm = 1: the second request within a minute is rate limited.
LIMITED_KEY = "tg-sdk-key-limited"
# A budget far below one request's worst case: every request is refused with 402.
BROKE_KEY = "tg-sdk-key-broke"

MAX_BODY_BYTES = 65536
READY_TIMEOUT_S = 30
CLIENT_TIMEOUT_S = 30


def sha256_hex(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


class Process:
    """A child whose stdout lines are read on a thread, so waiting for one can time out."""

    def __init__(self, name, argv, log_path):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self._lines = queue.Queue()
        self.child = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._log, text=True
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        # Keeps draining after the ready lines so the child can never block on a full pipe.
        for line in self.child.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def next_line(self):
        """The next stdout line, or None when the child ended or printed none in time."""
        try:
            return self._lines.get(timeout=READY_TIMEOUT_S)
        except queue.Empty:
            return None

    def ready_line(self, prefix):
        """The next stdout line; fails with the child's log when it is late, absent or wrong."""
        try:
            line = self._lines.get(timeout=READY_TIMEOUT_S)
        except queue.Empty:
            line = None
            reason = f"no ready line within {READY_TIMEOUT_S}s"
        else:
            reason = "exited before its ready line" if line is None else f"printed {line!r}"
        if line is None or not line.startswith(prefix):
            self.stop()
            log = Path(self.log_path).read_text(errors="replace")
            pytest.fail(
                f"{self.name} did not start: {reason}\n--- {self.log_path} ---\n{log}",
                pytrace=False,
            )
        return fields(line)

    def stop(self):
        if self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
        self._log.close()


def fields(line):
    """`tollgate ready public=A admin=B` → {"public": "A", "admin": "B"}."""
    return dict(word.split("=", 1) for word in line.split() if "=" in word)


@pytest.fixture(scope="session")
def tollgate_bin():
    path = os.environ.get("TOLLGATE_BIN")
    if not path:
        pytest.exit(
            "TOLLGATE_BIN is not set: point it at a built tollgate binary, e.g.\n"
            "  TOLLGATE_BIN=target/debug/tollgate python3 -m pytest tests/sdk -q",
            returncode=2,
        )
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        pytest.exit(f"TOLLGATE_BIN={path} is not an executable file", returncode=2)
    return path


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tollgate")


@pytest.fixture(scope="session")
def replicas(tollgate_bin, workdir):
    """Two simulated replicas serving the two upstream model names; their addresses."""
    argv = [tollgate_bin, "sim", "--replicas", "2"]
    argv += ["--model", "served-model", "--model", "test/other"]
    sim = Process("tollgate sim", argv, workdir / "sim.log")
    try:
        yield [sim.ready_line("sim ready")["addr"] for _ in range(2)]
    finally:
        sim.stop()


def config_text(replicas, state_dir):
    addrs = ", ".join(f'"{a}"' for a in replicas)
    return f"""\
[state]
dir = "{state_dir}"

[server]
listen = "127.0.0.1:0"
max_body_bytes = {MAX_BODY_BYTES}
grace_period_secs = 0

[admin]
listen = "127.0.0.1:0"

[[pools]]
name = "main"
replicas = [{addrs}]

[[models]]
slug = "test/model"
pool = "main"
upstream_model = "served-model"
context_tokens = 32768
max_output_tokens = 4096
default_max_tokens = 20
price = {{ input_per_mtok = 0.5, cached_input_per_mtok = 0.1, output_per_mtok = 1.5 }}
features = ["tools", "json_mode"]

[[models]]
slug = "test/other"
pool = "main"

[[keys]]
id = "team-a"
sha256 = "{sha256_hex(KEY)}"
models = ["*"]

[[keys]]
id = "team-b"
sha256 = "{sha256_hex(NARROW_KEY)}"
models = ["test/other"]

[[keys]]
id = "limited"
sha256 = "{sha256_hex(LIMITED_KEY)}"
models = ["*"]
rpm = 1

[[keys]]
id = "broke"
sha256 = "{sha256_hex(BROKE_KEY)}"
models = ["*"]
budget = {{ usd = 0.000001, period = "monthly" }}
"""


@pytest.fixture(scope="session")
def gateway(tollgate_bin, workdir, replicas):
    """The proxy's listeners: {"public": "127.0.0.1:P", "admin": "127.0.0.1:A"}."""
    config = workdir / "tollgate.toml"
    config.write_text(config_text(replicas, workdir / "state"))
    argv = [tollgate_bin, "run", "-c", str(config)]
    proxy = Process("tollgate run", argv, workdir / "tollgate.log")
    try:
        yield proxy.ready_line("tollgate ready")
    finally:
        proxy.stop()


@pytest.fixture(scope="session")
def make_client(gateway):
    """Builds an SDK client for `api_key`; the SDK's own retries are off so every error shows."""

    def make(api_key=KEY):
        return openai.OpenAI(
            base_url=f"http://{gateway['public']}/v1",
            api_key=api_key,
            max_retries=0,
            timeout=CLIENT_TIMEOUT_S,
        )

    return make


@pytest.fixture(scope="session")
def client(make_client):
    return make_client(KEY)


@pytest.fixture(scope="session")
def narrow_client(make_client):
    """team-b: may use test/other only."""
    return make_client(NARROW_KEY)


@pytest.fixture(scope="session")
def make_anthropic(gateway):
    """An Anthropic SDK client for `api_key` (sent as x-api-key, the SDK's default)."""

    def make(api_key=KEY):
        return anthropic.Anthropic(
            base_url=f"http://{gateway['public']}",
            api_key=api_key,
            max_retries=0,
            timeout=CLIENT_TIMEOUT_S,
        )

    return make


@pytest.fixture(scope="session")
def anthropic_client(make_anthropic):
    return make_anthropic(KEY)
