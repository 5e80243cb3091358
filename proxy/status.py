"""The status page: read-only, for operators, as HTML (`/status`) and JSON (`/status.json`).

It shows each credential's health and key age (the key masked, never whole), each
client's use of its share of the budget in the current window as a bar, the recent
refusals by code, and which config is loaded. It is served on the admin side only: to a
loopback client or over the unix socket, or to anyone presenting the admin token whose
SHA-256 digest is `admin.token_sha256` (`Authorization: Bearer <token>`); anyone else gets
401 `client_unauthenticated`.

The HTML is rendered on the server with no script and no external asset. Its Content
Security Policy allows nothing but the page's own style block (by hash): bars are inline
SVG rectangles whose width and colour are attributes, not styles.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.activity import ReportsShares, ShareUse
from proxy.errors import Refusal
from proxy.forward import Services
from proxy.policy import presented_token
from proxy.reload import Live
from proxy.requestid import REQUEST_ID_KEY
from proxy.settings import Settings, is_loopback_host

STATUS_HTML_PATH = "/status"
STATUS_JSON_PATH = "/status.json"
REFRESH_SECONDS = 10
BAR_WIDTH = 240
BAR_HEIGHT = 14
TRACK_COLOUR = "#e5e7eb"
FILL_COLOUR = "#2563eb"
OVER_COLOUR = "#d97706"  # above its share: it borrowed what others left unused

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#111827;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
table{border-collapse:collapse}th,td{text-align:left;padding:4px 12px 4px 0;vertical-align:middle}
th{font-weight:600;border-bottom:1px solid #d1d5db}code{font:13px ui-monospace,monospace}
.meta{color:#4b5563;margin:0}.state{padding:1px 6px;border-radius:3px;color:#fff}
.fresh{background:#15803d}.stale{background:#b45309}.expired,.missing{background:#b91c1c}
.bad{color:#b91c1c}.none{color:#6b7280}
"""
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
CSP = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; img-src 'none';"
    " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def admin_refusal(request: Request, settings: Settings) -> Refusal | None:
    """None when the caller may see the status page, else why not."""
    client = request.client
    if client is None or not client.host or is_loopback_host(client.host):
        return None  # loopback, or the unix socket (its file mode decides who connects)
    expected = settings.admin.token_sha256
    token = presented_token(request.headers.get("authorization"))
    if expected is not None and token is not None:
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        if hmac.compare_digest(digest, bytes.fromhex(expected.removeprefix("sha256:"))):
            return None
    return Refusal.of(
        "client_unauthenticated",
        "the status page is served to loopback clients, or with the admin token"
        " (Authorization: Bearer <token>, its digest in admin.token_sha256)",
    )


def usage_by_client(settings: Settings, services: Services) -> list[ShareUse]:
    """Each client's use in the current window against its credential's whole budget:
    what can be told without per-client shares."""
    limit = float(settings.rate_limit.requests)
    found = []
    for route in settings.routes:
        names: Sequence[str | None] = [c.name for c in route.clients] if route.clients else [None]
        for name in names:
            used = services.activity.used(route.name, name)
            found.append(ShareUse(route.credential, route.name, name, used, limit))
    return found


async def snapshot(live: Live) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data; never a key."""
    generation = live.current
    services = generation.services
    settings = generation.config.settings
    budget = services.budget
    shares: list[ShareUse] = []
    if isinstance(budget, ReportsShares):
        shares = list(await budget.share_usage())
    by_share = bool(shares)
    if not by_share:
        shares = usage_by_client(settings, services)
    rate = settings.rate_limit
    credentials = services.credentials.status()
    for name, entry in credentials.items():
        remaining = services.metrics.registry.get_sample_value(
            "publer_proxy_rate_limit_remaining", {"credential": name}
        )
        entry["budget"] = {
            "requests": rate.requests,
            "per_seconds": rate.per_seconds,
            "used": sum(s.used for s in shares if s.credential == name),
            "remaining_at_last_request": None if remaining is None else int(remaining),
        }
    config = live.describe()
    if live.last_reload is not None and live.last_reload.problems:
        config["last_reload"]["problems"] = list(live.last_reload.problems)
    activity = services.activity
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config,
        "credentials": credentials,
        "clients": {
            "window_seconds": rate.per_seconds,
            "share_source": "client" if by_share else "credential",
            "shares": [
                {
                    "credential": s.credential,
                    "route": s.route,
                    "client": s.client,
                    "used": s.used,
                    "share": s.share,
                    "cap": s.cap,
                    "fraction": round(s.used / s.share, 4) if s.share > 0 else None,
                }
                for s in shares
            ],
        },
        "refusals": {
            "window_seconds": 900,
            "by_code": activity.refusals_by_code(),
            "recent": [
                {
                    "seconds_ago": round(time.time() - r.at, 1),
                    "code": r.code,
                    "status": r.status,
                    "route": r.route,
                    "client": r.client,
                    "request_id": r.request_id,
                }
                for r in activity.recent_refusals()
            ],
        },
    }


def _bar(used: int, share: float) -> str:
    fraction = used / share if share > 0 else 1.0
    width = round(min(fraction, 1.0) * BAR_WIDTH)
    colour = OVER_COLOUR if fraction > 1.0 else FILL_COLOUR
    return (
        f'<svg class="bar" width="{BAR_WIDTH}" height="{BAR_HEIGHT}" role="img"'
        f' aria-label="{used} of {share:g}">'
        f'<rect width="{BAR_WIDTH}" height="{BAR_HEIGHT}" fill="{TRACK_COLOUR}"/>'
        f'<rect class="fill" width="{width}" height="{BAR_HEIGHT}" fill="{colour}"/></svg>'
    )


def _age(days: Any) -> str:
    if days is None:
        return '<span class="none">unknown (KV v1)</span>'
    return f"{float(days):.1f} days"


def render(data: dict[str, Any]) -> str:
    """The page as HTML: every value escaped, no script, no external asset."""
    e = escape
    config = data["config"]
    out = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        f"<title>publer-proxy status</title><style>{STYLE}</style></head><body>",
        "<h1>publer-proxy status</h1>",
        f'<p class="meta" id="config">config <code>{e(config["sha256"][:16])}</code> loaded'
        f" {e(config['loaded_at'])} (generation {config['generation']}); page made"
        f" {e(data['generated_at'])}</p>",
    ]
    last = config.get("last_reload")
    if last is not None:
        css = "" if last["result"] in ("applied", "unchanged") else ' class="bad"'
        out.append(
            f'<p id="last-reload"{css}>last reload ({e(last["trigger"])}, {e(last["at"])}):'
            f" {e(last['result'])}</p>"
        )
        if last.get("problems"):
            out.append("<ul>" + "".join(f"<li>{e(p)}</li>" for p in last["problems"]) + "</ul>")
    out += [
        '<section id="credentials"><h2>Credentials</h2><table><thead><tr><th>credential',
        "<th>health<th>key<th>version<th>key age<th>last read<th>budget used</tr></thead>",
        "<tbody>",
    ]
    for name, entry in data["credentials"].items():
        state = entry["state"]
        budget = entry["budget"]
        last_read = entry.get("last_read_seconds_ago")
        out.append(
            f'<tr data-credential="{e(name)}" data-state="{e(state)}"><td>{e(name)}'
            f'<td><span class="state {e(state)}">{e(state)}</span>'
            + (
                f'<br><span class="bad">{e(str(entry["reason"]))}</span>'
                if "reason" in entry
                else ""
            )
            + f"<td><code>{e(str(entry.get('key', '-')))}</code>"
            f"<td>{e(str(entry.get('key_version', '-')))}"
            f"<td>{_age(entry.get('key_age_days'))}"
            + (' <span class="bad">rotation due</span>' if entry.get("rotation_due") else "")
            + f"<td>{'-' if last_read is None else f'{last_read:g} s ago'}"
            f"<td>{budget['used']} / {budget['requests']} per {budget['per_seconds']:g} s</tr>"
        )
    clients = data["clients"]
    share_word = "share" if clients["share_source"] == "client" else "credential's budget"
    out += [
        "</tbody></table></section>",
        f'<section id="clients"><h2>Clients: use of their {share_word},'
        f" last {clients['window_seconds']:g} s</h2><table><thead><tr><th>route<th>client",
        "<th>credential<th>use<th></tr></thead><tbody>",
    ]
    for s in clients["shares"]:
        client = s["client"]
        label = e(client) if client is not None else '<span class="none">(open route)</span>'
        out.append(
            f'<tr class="client" data-route="{e(s["route"])}" data-client="{e(client or "")}"'
            f' data-used="{s["used"]}" data-share="{s["share"]:g}"><td>{e(s["route"])}'
            f"<td>{label}<td>{e(s['credential'])}<td>{_bar(s['used'], s['share'])}"
            f"<td>{s['used']} / {s['share']:g}</tr>"
        )
    refusals = data["refusals"]
    out += [
        "</tbody></table></section>",
        '<section id="refusals"><h2>Refusals, last 15 minutes</h2>',
    ]
    if refusals["by_code"]:
        out.append("<table><thead><tr><th>code<th>count</tr></thead><tbody>")
        for code, count in refusals["by_code"].items():
            out.append(f'<tr class="refusal" data-code="{e(code)}"><td>{e(code)}<td>{count}</tr>')
        out.append("</tbody></table><h2>Most recent</h2><table><thead><tr><th>when<th>code")
        out.append("<th>status<th>route<th>client<th>request id</tr></thead><tbody>")
        for r in refusals["recent"]:
            out.append(
                f"<tr><td>{r['seconds_ago']:g} s ago<td>{e(r['code'])}<td>{r['status']}"
                f"<td>{e(r['route'] or '-')}<td>{e(r['client'] or '-')}"
                f"<td><code>{e(r['request_id'])}</code></tr>"
            )
        out.append("</tbody></table>")
    else:
        out.append('<p class="none">none</p>')
    out.append("</section></body></html>")
    return "\n".join(out)


def _live(request: Request) -> Live:
    live: Live = request.state.live
    return live


def _refused(request: Request, refusal: Refusal) -> Response:
    body = refusal.body(request.scope[REQUEST_ID_KEY])
    headers = dict((k.decode(), v.decode()) for k, v in refusal.headers(len(body)))
    head = request.method == "HEAD"
    return Response(b"" if head else body, refusal.status, headers)


async def status_html(request: Request) -> Response:
    """The status page as HTML, under a strict Content Security Policy."""
    live = _live(request)
    refusal = admin_refusal(request, live.current.config.settings)
    if refusal is not None:
        return _refused(request, refusal)
    page = render(await snapshot(live))
    headers = {**SECURITY_HEADERS, "content-security-policy": CSP}
    return Response(page, media_type="text/html; charset=utf-8", headers=headers)


async def status_json(request: Request) -> Response:
    """The status page's data as JSON."""
    live = _live(request)
    refusal = admin_refusal(request, live.current.config.settings)
    if refusal is not None:
        return _refused(request, refusal)
    return JSONResponse(await snapshot(live), headers=SECURITY_HEADERS)
