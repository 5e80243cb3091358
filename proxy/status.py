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
from datetime import UTC, datetime
from html import escape
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.budget.shares import ShareUse, WindowUse, headroom, nearest_limit
from proxy.budget.stores import window_use
from proxy.config.settings import ANONYMOUS_CLIENT, Settings, is_loopback_host
from proxy.describe import describe_limits
from proxy.records.activity import REFUSAL_WINDOW_SECONDS
from proxy.records.request_ids import REQUEST_ID_KEY
from proxy.reload import Live
from proxy.rules.policy import presented_token, stored_digest, token_digest
from proxy.rules.refusals import Refusal

STATUS_HTML_PATH = "/status"
STATUS_JSON_PATH = "/status.json"
REFRESH_SECONDS = 10
BAR_WIDTH = 240
BAR_HEIGHT = 14
TRACK_COLOUR = "#e5e7eb"
FILL_COLOUR = "#2563eb"
OVER_COLOUR = "#d97706"  # above its share: it borrowed what others left unused

LIMIT_WORDS = {
    "client_share": "its share",
    "client_cap": "its cap",
    "route_cap": "the route's cap",
    "credential": "the credential's budget",
}

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#111827;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
table{border-collapse:collapse}th,td{text-align:left;padding:4px 12px 4px 0;vertical-align:middle}
th{font-weight:600;border-bottom:1px solid #d1d5db}code{font:13px ui-monospace,monospace}
.meta{color:#4b5563;margin:0}.state{padding:1px 6px;border-radius:3px;color:#fff}
.fresh{background:#15803d}.stale{background:#b45309}.expired,.missing{background:#b91c1c}
.bad{color:#b91c1c}.none{color:#6b7280}.over{color:#b45309}
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
    if (
        expected is not None
        and token is not None
        and hmac.compare_digest(token_digest(token), stored_digest(expected))
    ):
        return None
    return Refusal.of(
        "client_unauthenticated",
        "the status page is served to loopback clients, or with the admin token"
        " (Authorization: Bearer <token>, its digest in admin.token_sha256)",
    )


def _share_row(window: WindowUse, use: ShareUse) -> dict[str, Any]:
    left = headroom(window, use)
    nearest = nearest_limit(left)
    return {
        "credential": window.credential,
        "route": use.route,
        "client": use.client,
        "used": use.used,
        "share": round(use.share, 2),
        "cap": use.cap,
        "route_cap": use.route_cap,
        "fraction": round(use.used / use.share, 4),
        "nearest_limit": nearest,
        "left": round(left[nearest], 2),
    }


async def snapshot(live: Live) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data; never a key.

    Budget figures come from the budget itself (Redis when replicas share one), so every
    replica shows the same window.
    """
    generation = live.current
    services = generation.services
    rate = generation.config.settings.rate_limit
    windows = await window_use(services.budget, services.shares, rate)
    spent = {w.credential: w.used for w in windows}
    credentials = services.credentials.status()
    for name, entry in credentials.items():
        remaining = services.metrics.registry.get_sample_value(
            "publer_proxy_rate_limit_remaining", {"credential": name}
        )
        entry["budget"] = {
            "requests": rate.requests,
            "per_seconds": rate.per_seconds,
            "used": spent.get(name, 0),
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
            "shares": [_share_row(w, use) for w in windows for use in w.shares],
        },
        "limits": [
            {"route": route.name, "client": client, "limits": text}
            for route in generation.config.settings.routes
            for client, text in describe_limits(route)
        ],
        "refusals": {
            "window_seconds": REFUSAL_WINDOW_SECONDS,
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


def _caps(share: dict[str, Any]) -> str:
    caps = []
    if share["cap"] is not None:
        caps.append(f"{share['cap']} (client)")
    if share["route_cap"] is not None:
        caps.append(f"{share['route_cap']} (route)")
    return ", ".join(caps) or '<span class="none">none</span>'


def _nearest(limit: str, left: float) -> str:
    what = LIMIT_WORDS.get(limit, limit)
    if left < 0:
        return f'{escape(what)}: <span class="over">{-left:g} borrowed</span>'
    return f"{escape(what)}: {left:g} left"


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
    out += [
        "</tbody></table></section>",
        '<section id="clients"><h2>Clients: use of their share of the budget,'
        f" last {clients['window_seconds']:g} s</h2><table><thead><tr><th>route<th>client",
        "<th>credential<th>use of share<th>used / share<th>cap<th>nearest limit</tr>",
        "</thead><tbody>",
    ]
    for s in clients["shares"]:
        client = s["client"]
        label = (
            '<span class="none">(open route)</span>' if client == ANONYMOUS_CLIENT else e(client)
        )
        out.append(
            f'<tr class="client" data-route="{e(s["route"])}" data-client="{e(client)}"'
            f' data-used="{s["used"]}" data-share="{s["share"]:g}"'
            f' data-nearest="{e(s["nearest_limit"])}"><td>{e(s["route"])}'
            f"<td>{label}<td>{e(s['credential'])}<td>{_bar(s['used'], s['share'])}"
            f"<td>{s['used']} / {s['share']:g}<td>{_caps(s)}"
            f"<td>{_nearest(s['nearest_limit'], s['left'])}</tr>"
        )
    out += [
        "</tbody></table></section>",
        '<section id="limits"><h2>Limits beyond scopes</h2>',
    ]
    if data["limits"]:
        out.append("<table><thead><tr><th>route<th>client<th>may</tr></thead><tbody>")
        for row in data["limits"]:
            client = row["client"]
            out.append(
                f'<tr class="limits" data-route="{e(row["route"])}"'
                f' data-client="{e(client or "")}"><td>{e(row["route"])}'
                f"<td>{e(client) if client else '(every client)'}<td>{e(row['limits'])}</tr>"
            )
        out.append("</tbody></table>")
    else:
        out.append('<p class="none">none: every route may do what its scopes allow</p>')
    refusals = data["refusals"]
    out += [
        "</section>",
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


def _admitted(request: Request) -> Live | Response:
    """The config generations, or the refusal for a caller not on the admin side."""
    live: Live = request.state.live
    refusal = admin_refusal(request, live.current.config.settings)
    if refusal is None:
        return live
    body = refusal.body(request.scope[REQUEST_ID_KEY])
    headers = dict((k.decode(), v.decode()) for k, v in refusal.headers(len(body)))
    head = request.method == "HEAD"
    return Response(b"" if head else body, refusal.status, headers)


async def status_html(request: Request) -> Response:
    """The status page as HTML, under a strict Content Security Policy."""
    live = _admitted(request)
    if isinstance(live, Response):
        return live
    page = render(await snapshot(live))
    headers = {**SECURITY_HEADERS, "content-security-policy": CSP}
    return Response(page, media_type="text/html; charset=utf-8", headers=headers)


async def status_json(request: Request) -> Response:
    """The status page's data as JSON."""
    live = _admitted(request)
    if isinstance(live, Response):
        return live
    return JSONResponse(await snapshot(live), headers=SECURITY_HEADERS)
