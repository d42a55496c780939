"""`tollgate demo`: what it prints works as printed.

The demo runs on port 0; its banner is read until its last line, then each printed example
(the two curl commands and the two Python snippets) is run exactly as printed, the Python
ones with this interpreter and the official SDKs, each with a timeout.
"""

import subprocess
import sys

import pytest

from conftest import Process

EXAMPLE_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def banner(tollgate_bin, tmp_path_factory):
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    argv = [tollgate_bin, "demo", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    demo = Process("tollgate demo", argv, log)
    lines = []
    try:
        while not lines or not lines[-1].startswith("Stop with Ctrl-C"):
            line = demo.next_line()
            if line is None:
                pytest.fail(f"the demo printed no full banner: {lines}\n{log.read_text()}")
            lines.append(line)
        yield lines
    finally:
        demo.stop()


def block_after(lines, heading):
    """The lines after `heading` up to the next blank line."""
    start = lines.index(heading) + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    return "\n".join(lines[start:end])


def run(argv, **kwargs):
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S, **kwargs
    )


def test_the_printed_curl_commands_answer(banner):
    start = banner.index("curl:") + 1
    end = banner.index("Python (pip install openai):")
    commands = "\n".join(banner[start:end]).strip().split("\n\n")
    assert len(commands) == 2, commands
    plain, streamed = (run(["bash", "-c", c]) for c in commands)
    assert plain.returncode == 0, plain.stderr
    assert '"object":"chat.completion"' in plain.stdout, plain.stdout
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.rstrip().endswith("data: [DONE]"), streamed.stdout[-200:]


@pytest.mark.parametrize(
    "heading", ["Python (pip install openai):", "Python (pip install anthropic):"]
)
def test_the_printed_python_snippets_run_as_pasted(banner, heading):
    snippet = block_after(banner, heading)
    done = run([sys.executable, "-c", snippet])
    assert done.returncode == 0, f"{snippet}\n{done.stderr}"
    assert done.stdout.strip(), "the snippet prints the model's answer"
