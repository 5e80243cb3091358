"""The examples of the README and of every docs page run as written against the local
stack of `make run`.

An example is a ```sh block right after a `<!-- example -->` line; an `<!-- output -->` line
and a fenced block after it show what the example prints, where `...` stands for any text
and JSON is compared as `json.dumps` renders it (the pages' spacing). The examples run in
bash from the repository root, after the `export` lines the stack printed, as a user pastes
them, with the stack on a free port instead of 8080.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.bao import free_port
from tests.docs_pages import README, REPO, pages

FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
README_PORT = "127.0.0.1:8080"
README_EXPORTS = ("CLIENT_TOKEN", "VAULT_ADDR", "PUBLER_PROXY_CONFIG")


@dataclass(frozen=True)
class Example:
    """A marked shell example of a page and the output it shows, if any."""

    line: int
    script: str
    output: str | None


def examples(text: str) -> list[Example]:
    """The marked examples of a page's text, in order."""
    found: list[Example] = []
    for marker in re.finditer(r"^<!-- example -->\n", text, re.MULTILINE):
        block = FENCE.match(text, marker.end())
        assert block is not None and block[1] == "sh", f"no ```sh block after {marker}"
        output: str | None = None
        shown = re.compile(r"<!-- output -->\n").match(text, block.end())
        if shown is not None:
            output_block = FENCE.match(text, shown.end())
            assert output_block is not None, "no fenced block after <!-- output -->"
            output = output_block[2].strip()
        found.append(Example(text.count("\n", 0, marker.start()) + 1, block[2], output))
    return found


def shown_as(stdout: str) -> str:
    """The output as a page shows it: JSON in `json.dumps`'s spacing, else stripped."""
    try:
        return json.dumps(json.loads(stdout), ensure_ascii=False)
    except ValueError:
        return stdout.strip()


def matches(shown: str, actual: str) -> bool:
    """Whether `actual` is what the page shows: a quoted string ending in `..."` stands for
    any string (`"9b0c..."`, a request id), and any other `...` for any text."""
    pattern = ""
    for index, part in enumerate(re.split(r'("[^"\n]*\.\.\.")', shown)):
        if index % 2:
            pattern += r'"[^"]*"'
        else:
            pattern += ".*".join(re.escape(piece) for piece in part.split("..."))
    return re.fullmatch(pattern, actual, re.DOTALL) is not None


def test_examples_are_found_and_compared() -> None:
    """The marker syntax is read as documented: script, output, `...` as a wildcard."""
    text = (
        "x\n<!-- example -->\n```sh\necho hi\n```\n<!-- output -->\n```text\nh...\n```\n"
        "<!-- example -->\n```sh\ntrue\n```\n"
    )
    assert examples(text) == [Example(2, "echo hi\n", "h..."), Example(10, "true\n", None)]
    assert matches('{"a": "9b...", "b": 1}', shown_as('{"a":"xyz","b":1}'))
    assert not matches('{"a": "9b...", "b": 1}', shown_as('{"a":"xyz","b":2}'))
    assert matches('{"a": 1, ...}', shown_as('{"a":1,"b":[2]}'))
    assert matches("sha256:...", "sha256:00ff")


def every_example() -> list[tuple[str, Example]]:
    """Every marked example of the README and of the docs pages, with its page."""
    return [
        (str(page.relative_to(REPO)), example)
        for page in pages()
        for example in examples(page.read_text(encoding="utf-8"))
    ]


def test_every_example_of_the_pages_is_found() -> None:
    """The examples the README held before it was split into the docs pages are all still
    marked, wherever they moved: the first curl line in the README; `check --online`, an app
    developer's call, a refusal and a client token's digest in the pages."""
    found = every_example()
    assert [page for page, _ in found].count("README.md") >= 1
    scripts = " ".join(example.script for _, example in found)
    for part in [
        "/api/v1/users/me",
        "publer-proxy check --online",
        "/posting/api/v1/analytics/charts",
        "/posting/api/v1/posts?page=0&state=scheduled",
        "publer-proxy hash-token",
    ]:
        assert part in scripts, part
    assert len(found) >= 6


@dataclass(frozen=True)
class Stack:
    """`publer-proxy dev` running on a free port, and what it printed."""

    port: int
    log: Path

    def exports(self) -> list[str]:
        """The `export` lines the stack told the user to paste for the pages' examples
        (the client token, OpenBao and the config; not the forward proxy's variables)."""
        return [
            line.strip()
            for line in self.log.read_text().splitlines()
            if line.startswith(tuple(f"  export {name}=" for name in README_EXPORTS))
        ]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The local stack of `make run`, as `publer-proxy dev --port P`, until it is ready."""
    port = free_port()
    log = tmp_path_factory.mktemp("readme") / "dev.log"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PUBLER_API_KEY", "PUBLER_WORKSPACE_ID", "PUBLER_PROXY_CONFIG")
        and not k.startswith(("VAULT_", "BAO_"))
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "dev", "--port", str(port)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C stops" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield Stack(port, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.parametrize(
    ("page", "example"), every_example(), ids=[f"{p}:{e.line}" for p, e in every_example()]
)
def test_readme_example_runs_as_written(stack: Stack, page: str, example: Example) -> None:
    """Each marked example of the README and the docs pages exits 0 and prints what its page
    shows."""
    script = example.script.replace(README_PORT, f"127.0.0.1:{stack.port}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.pop("PUBLER_PROXY_CONFIG", None)
    result = subprocess.run(
        ["bash", "-c", "set -eo pipefail\n" + "\n".join(stack.exports()) + "\n" + script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, page + "\n" + result.stdout + result.stderr
    if example.output is not None:
        assert matches(example.output, shown_as(result.stdout)), page + "\n" + result.stdout


def test_stack_prints_the_first_example(stack: Stack) -> None:
    """`make run` prints the README's first curl line, and a line to paste for each of the
    client token, OpenBao (its address) and the config, never a token itself."""
    printed = stack.log.read_text()
    first = examples(README.read_text(encoding="utf-8"))[0].script.strip()
    assert first.replace(README_PORT, f"127.0.0.1:{stack.port}") in printed
    exports = " ".join(stack.exports())
    for name in ("CLIENT_TOKEN=$(cat ", "VAULT_ADDR=http://127.0.0.1:", "VAULT_TOKEN=$(cat "):
        assert name in exports
    for path in re.findall(r"\$\(cat (\S+)\)", exports):
        assert Path(path).read_text(encoding="utf-8") not in printed
    [vault_url] = re.findall(r"VAULT_ADDR=(\S+)", exports)
    assert httpx.get(f"{vault_url}/v1/sys/health", trust_env=False).json()["sealed"] is False
