"""Web pages in a real browser cannot use the proxy: headless Chromium against `serve`
and `dev`, open and client routes, the API, operational and forward-proxy listeners.

A page of another origin (a second loopback server) tries what needs no preflight (HTML
forms in the three encodings, no-cors fetches, image and script loads), then preflighted
and plain CORS reads, and writes what it could read into its DOM. DNS rebinding is
simulated by mapping `attacker.test` to 127.0.0.1 and loading the proxy's own port under
that name: the browser then sees the proxy as the page's own origin, and only the Host
check stands in the way. The recording upstream must receive nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from proxy.rules.policy import hash_token
from tests.bao import Bao, free_port
from tests.servers import Sandbox, proxy_config, start_proxy
from tests.tunnel_stack import start_tunnel_stack
from tests.waiting import eventually

CLIENT_TOKEN = "ct_browser_attack_0123456789abcdef"
REPO = Path(__file__).resolve().parent.parent
ATTACK_JS = """
const targets = TARGETS;
const out = [];
function frameLoad(frame) {
  return new Promise((done) => {
    frame.onload = () => done();
    setTimeout(done, 5000);
  });
}
async function submit(url, enctype) {
  const frame = document.createElement("iframe");
  frame.name = "f" + Math.random().toString(36).slice(2);
  document.body.appendChild(frame);
  const form = document.createElement("form");
  form.method = "POST";
  form.action = url;
  form.enctype = enctype;
  form.target = frame.name;
  const field = document.createElement("input");
  field.name = '{"bulk":{"state":"scheduled","posts":[{"text":"x"}]},"pad":"';
  field.value = '"}';
  form.appendChild(field);
  document.body.appendChild(form);
  const loaded = frameLoad(frame);
  form.submit();
  await loaded;
}
function load(tag, url) {
  return new Promise((done) => {
    const element = document.createElement(tag);
    element.onload = () => done(tag + " loaded " + url);
    element.onerror = () => done(tag + " failed " + url);
    element.src = url;
    document.body.appendChild(element);
    setTimeout(() => done(tag + " timed out " + url), 5000);
  });
}
async function read(url, init) {
  try {
    const answer = await fetch(url, init);
    const text = await answer.text();
    out.push("READ " + url + " " + answer.status + " " + text.slice(0, 200));
  } catch (error) {
    out.push("blocked " + url);
  }
}
async function run() {
  for (const base of targets) {
    const post = base + "/api/v1/posts/schedule";
    for (const enctype of
      ["application/x-www-form-urlencoded", "multipart/form-data", "text/plain"]) {
      await submit(post, enctype);
      await submit(base + "/c/api/v1/posts/schedule", enctype);
    }
    for (const url of [post, base + "/c/api/v1/posts/schedule"]) {
      try {
        await fetch(url, {method: "POST", mode: "no-cors",
          headers: {"Content-Type": "text/plain"}, body: '{"bulk":{"state":"scheduled"}}'});
      } catch (error) {}
    }
    out.push(await load("img", base + "/api/v1/users/me"));
    out.push(await load("script", base + "/api/v1/accounts"));
    await read(post, {method: "POST", headers: {"Content-Type": "application/json"},
      body: "{}"});
    await read(base + "/c/api/v1/users/me",
      {headers: {"Authorization": "Bearer-API CLIENT_TOKEN"}});
    for (const path of ["/api/v1/users/me", "/status.json", "/status", "/readyz",
                        "/metrics", "/healthz"]) {
      await read(base + path, {});
    }
  }
  document.getElementById("out").textContent = JSON.stringify(out);
  document.title = "attacks done";
}
run();
"""


class Attacker(BaseHTTPRequestHandler):
    """The other site: serves the attack page for the targets in its query."""

    targets: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        script = ATTACK_JS.replace("TARGETS", json.dumps(self.targets))
        script = script.replace("CLIENT_TOKEN", CLIENT_TOKEN)
        page = f'<html><head><title>running</title></head><body><pre id="out"></pre><script>{script}</script></body></html>'  # noqa: E501
        data = page.encode()
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args: object) -> None:
        pass


def chromium(workdir: Path, url: str, *extra: str, scripted: bool = True) -> str:
    """The DOM of `url` as headless Chromium dumps it, with `attacker.test` resolving to
    127.0.0.1; `scripted`: once the page's scripts and the loads they start are done (a
    virtual-time budget: Chromium dumps when the budget is spent, and spends it at once
    while nothing is pending)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary is not None, "chromium is not installed (make test installs it)"
    profile = workdir / f"profile-{free_port()}"
    command = [
        binary,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP attacker.test 127.0.0.1",
        # Virtual time runs ahead while nothing is pending, so each load's 5 s fallback
        # may be spent in full on a busy machine (18 form posts alone could take 90 s of
        # it); idle virtual time costs no real time, so the budget is generous.
        *(["--virtual-time-budget=900000"] if scripted else []),
        *extra,
        "--dump-dom",
        url,
    ]
    env = {"HOME": str(workdir), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=180, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture
def attacker() -> Iterator[type[Attacker]]:
    """The attacker's server on a loopback port of its own; set `targets` before use."""

    class Page(Attacker):
        targets: ClassVar[list[str]] = []

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Page.url = f"http://127.0.0.1:{server.server_address[1]}/"  # type: ignore[attr-defined]
    yield Page
    server.shutdown()
    server.server_close()


def attack(
    workdir: Path, page: type[Attacker], targets: list[str], *extra: str, at: str | None = None
) -> list[str]:
    """Run the attack page (from its own URL, or `at`) against `targets`; what it reports."""
    page.targets = targets
    dom = chromium(workdir, at or page.url, *extra)  # type: ignore[attr-defined]
    assert "<title>attacks done</title>" in dom, dom[-3000:]
    found: list[str] = json.loads(dom.split('<pre id="out">', 1)[1].split("</pre>", 1)[0])
    return found


def rebound(workdir: Path, port: int, path: str) -> str:
    """The proxy's answer to a page at attacker.test:PORT (the proxy's own port) whose
    name now resolves to 127.0.0.1: to the browser, the proxy is that page's origin."""
    return chromium(workdir, f"http://attacker.test:{port}{path}", scripted=False)


def _routes() -> list[dict[str, Any]]:
    scopes = ["posts", "media", "accounts", "job_status", "users"]
    base = {"credential": "publer", "workspace_id": "5f8d7a62c9e77e001f36e3a1", "scopes": scopes}
    client = {"name": "app", "token_sha256": hash_token(CLIENT_TOKEN)}
    return [
        {**base, "name": "open"},
        {**base, "name": "clients", "prefix": "/c", "clients": [client]},
    ]


def _nothing_read(reports: list[str]) -> None:
    assert [r for r in reports if r.startswith("READ")] == []
    # An image or a script "loads" only if the browser got a usable answer; none here.
    assert [r for r in reports if " loaded " in r] == []


def test_pages_cannot_use_serve(
    tmp_path: Path,
    bao: Bao,
    token_file: Path,
    sandbox: Sandbox,
    attacker: type[Attacker],
) -> None:
    """`serve`: forms, no-cors fetches, loads and CORS reads from another origin reach
    nothing upstream and read nothing, on open and client routes and the operational
    endpoints; a rebound name gets 421 host_denied; the operator's own browser still
    opens /status."""
    config = proxy_config(bao.url, sandbox.url, token_file=token_file, routes=_routes())
    proxy = start_proxy(tmp_path / "proxy", config)
    try:
        sandbox.clear()
        port = int(proxy.url.rsplit(":", 1)[1])
        targets = [proxy.url, f"http://localhost:{port}", f"http://attacker.test:{port}"]
        reports = attack(tmp_path, attacker, targets)
        _nothing_read(reports)
        for path in ("/api/v1/users/me", "/status.json", "/readyz", "/metrics"):
            dom = rebound(tmp_path, port, path)
            assert "host_denied" in dom and "attacker.test" in dom, dom
            assert "publer" not in dom.split("host_denied")[0]
        assert sandbox.requests() == []
        decisions = {event["decision"] for event in proxy.access()}
        assert decisions == {"origin_denied", "host_denied"}, decisions
        own = chromium(tmp_path, f"{proxy.url}/status", scripted=False)
        assert 'data-credential="publer"' in own
        # Programs that are not browsers are not affected.
        assert httpx.get(f"{proxy.url}/api/v1/users/me", trust_env=False).status_code == 200
        assert sandbox.requests() != []
    finally:
        proxy.stop()


def test_listed_origin_is_the_only_one_that_reads(
    tmp_path: Path,
    bao: Bao,
    token_file: Path,
    sandbox: Sandbox,
    attacker: type[Attacker],
) -> None:
    """With the attacker's origin listed in browser.allowed_origins, its page may call and
    read the API routes (CORS preflight answered for it) but none of the operational
    endpoints; the same page under another name may not read anything."""
    config = proxy_config(bao.url, sandbox.url, token_file=token_file, routes=_routes())
    listed = attacker.url.rstrip("/")  # type: ignore[attr-defined]
    config["browser"] = {"allowed_origins": [listed]}
    proxy = start_proxy(tmp_path / "proxy", config)
    try:
        reports = attack(tmp_path, attacker, [proxy.url])
        reads = [r for r in reports if r.startswith("READ")]
        assert any("/c/api/v1/users/me 200" in r for r in reads), reports
        assert any("/api/v1/posts/schedule" in r for r in reads), reports
        operational = ("/status.json ", "/status ", "/readyz ", "/metrics ", "/healthz ")
        assert not [r for r in reads if any(path in r for path in operational)], reads
        port = attacker.url.rsplit(":", 1)[1].rstrip("/")  # type: ignore[attr-defined]
        other = attack(tmp_path, attacker, [proxy.url], at=f"http://attacker.test:{port}/")
        _nothing_read(other)
    finally:
        proxy.stop()


def test_pages_cannot_use_the_forward_proxy(
    tmp_path: Path, bao: Bao, token_file: Path, api_key: str, attacker: type[Attacker]
) -> None:
    """The forward-proxy listener: pages posting to it or rebinding to its port get nothing,
    and a browser that uses it as its proxy cannot have a page call Publer through it."""
    stack = start_tunnel_stack(tmp_path / "stack", bao, token_file, api_key)
    try:
        stack.sandbox.clear()
        forward = f"http://127.0.0.1:{stack.forward_port}"
        _nothing_read(attack(tmp_path, attacker, [forward]))
        dom = rebound(tmp_path, stack.forward_port, "/api/v1/users/me")
        assert "host_denied" in dom, dom
        # A browser whose proxy is the listener; the page itself is on loopback (not proxied).
        through = attack(
            tmp_path,
            attacker,
            ["https://app.publer.com"],
            f"--proxy-server={forward}",
            "--ignore-certificate-errors",
        )
        _nothing_read(through)
        assert stack.sandbox.requests() == []
        refused = {e["decision"] for e in stack.proxy.access()}
        assert "origin_denied" in refused, refused
    finally:
        stack.proxy.stop()
        stack.sandbox.stop()


def test_pages_cannot_use_dev(tmp_path: Path, attacker: type[Attacker]) -> None:
    """`publer-proxy dev` (the team's real setup on loopback): the attack page and a rebound
    name get nothing from it, and its own /status still opens in the browser."""
    port = free_port()
    log = tmp_path / "dev.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUBLER_", "VAULT_", "AWS_"))}
    command = [sys.executable, "-m", "proxy", "dev", "--port", str(port), "--source", "file"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(f"{url}/readyz", timeout=1, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        eventually(ready, timeout=90)
        _nothing_read(attack(tmp_path, attacker, [url, f"http://attacker.test:{port}"]))
        dom = rebound(tmp_path, port, "/api/v1/posts/schedule")
        assert "host_denied" in dom, dom
        assert 'data-credential="publer"' in chromium(tmp_path, f"{url}/status", scripted=False)
        text = log.read_text()
        assert '"decision":"allowed"' not in text, text[-3000:]
        assert "origin_denied" in text and "host_denied" in text
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
