"""`make bench`, limits part: the CPU cost of inspecting a request body on a limited route.

The decision (`proxy/rules/limits.py`) parses the body once, strictly, and walks it. Two bodies
just under the 256 KiB inspection limit are measured: many posts with many account
entries (the most keys to walk), and one post with a long text (the most bytes to
decode). Plain `json.loads` of the same bytes is measured beside it, for scale. Writes
a results file in bench/results/ with the date, the commit and the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import results

from proxy.rules.limits import INSPECT_LIMIT_BYTES, LimitedCall, Limits, decide

BENCH_DIR = Path(__file__).resolve().parent
ACCOUNTS = [f"6120c1f3a1b2c3d4e5f6{n:04x}" for n in range(50)]
LIMITS = Limits(accounts=frozenset(ACCOUNTS), publish_now=False)
JSON = [(b"content-type", b"application/json")]


def many_posts() -> bytes:
    """Posts of ten accounts each, as many as fit under the inspection limit."""
    posts: list[dict[str, Any]] = []
    while True:
        post = {
            "networks": {"facebook": {"type": "status", "text": f"post {len(posts)}"}},
            "accounts": [{"id": a, "scheduled_at": "2030-01-01T09:00:00Z"} for a in ACCOUNTS[:10]],
        }
        body = json.dumps({"bulk": {"state": "scheduled", "posts": [*posts, post]}}).encode()
        if len(body) > INSPECT_LIMIT_BYTES:
            return json.dumps({"bulk": {"state": "scheduled", "posts": posts}}).encode()
        posts.append(post)


def long_text() -> bytes:
    """One post whose text fills the body up to the inspection limit."""
    shell: dict[str, Any] = {
        "bulk": {
            "state": "scheduled",
            "posts": [
                {
                    "networks": {"facebook": {"type": "status", "text": ""}},
                    "accounts": [{"id": ACCOUNTS[0], "scheduled_at": "2030-01-01T09:00:00Z"}],
                }
            ],
        }
    }
    filler = INSPECT_LIMIT_BYTES - len(json.dumps(shell).encode())
    shell["bulk"]["posts"][0]["networks"]["facebook"]["text"] = "é" * (filler // 2)
    return json.dumps(shell, ensure_ascii=False).encode()


def timings(run: Any, rounds: int) -> list[float]:
    """Milliseconds per call of `run`, `rounds` times."""
    found = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        found.append((time.perf_counter() - started) * 1000)
    return found


def main() -> int:
    """Measure, print, and write the results file (`bench/results.py`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args()
    cases: dict[str, Any] = {}
    for name, body in (("many_posts", many_posts()), ("long_text", long_text())):
        call = LimitedCall("POST", "/posts/schedule", b"", JSON, body)
        assert decide(call, LIMITS).refusal is None, name
        decided = timings(lambda call=call: decide(call, LIMITS), args.rounds)
        parsed = timings(lambda body=body: json.loads(body), args.rounds)
        cases[name] = {
            "body_bytes": len(body),
            "decide_ms_p50": round(statistics.median(decided), 3),
            "decide_ms_p95": round(statistics.quantiles(decided, n=20)[-1], 3),
            "json_loads_ms_p50": round(statistics.median(parsed), 3),
        }
        print(
            f"{name}: {len(body)} bytes, decision p50 {cases[name]['decide_ms_p50']} ms"
            f" (p95 {cases[name]['decide_ms_p95']} ms), json.loads alone"
            f" {cases[name]['json_loads_ms_p50']} ms"
        )
    lines = [
        f"| {name} | {case['body_bytes']:,} | {case['decide_ms_p50']} | {case['decide_ms_p95']}"
        f" | {case['json_loads_ms_p50']} |"
        for name, case in cases.items()
    ]
    report = "\n".join(
        [
            f"The limits decision over a {INSPECT_LIMIT_BYTES // 1024} KiB body, {args.rounds}"
            " rounds each (milliseconds).",
            "",
            "| body | bytes | decision p50 | decision p95 | json.loads alone p50 |",
            "|---|---:|---:|---:|---:|",
            *lines,
        ]
    )
    found = results.record(
        "limits",
        "Inspecting bodies on limited routes",
        report,
        {"rounds": args.rounds, "inspect_limit_bytes": INSPECT_LIMIT_BYTES, "cases": cases},
        {},
    )
    print(f"written to {results.save(found, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
