"""The audit log's hash chain: sealing a line, and verifying a file, as pure functions.

Each audit line is one JSON object with `"event": "audit"`, a sequence number `seq`
(1, 2, 3 ... within one file) and `prev`, the SHA-256 of the previous audit line's bytes
(64 zeros for the first). Altering a line changes its hash, which the next line recorded;
removing or reordering lines breaks the sequence. Only the last lines can go unnoticed
by the chain alone: the *head* (the line count and the last line's hash), published
where the log's writer cannot rewrite it later, closes that gap.

Other lines in the same file (a stdout stream shared with the proxy's own log) are
skipped: a line that stops being an audit line breaks the chain where it was.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

GENESIS = "0" * 64
_HEAD_RE = re.compile(r"^(\d+):([0-9a-f]{64})$")


def line_hash(line: bytes) -> str:
    """The SHA-256 (hex) of one audit line, without its newline."""
    return hashlib.sha256(line).hexdigest()


@dataclass(frozen=True)
class Head:
    """The chain's head: `lines` audit lines so far, the last one hashing to `hash`."""

    lines: int
    hash: str

    def __str__(self) -> str:
        return f"{self.lines}:{self.hash}"

    @classmethod
    def parse(cls, text: str) -> Head:
        """`LINES:HASH` as `verify --head` takes it and `str()` writes it; ValueError."""
        found = _HEAD_RE.match(text.strip())
        if found is None:
            raise ValueError("a head is LINES:HASH, such as 42:<64 hex digits>")
        return cls(int(found.group(1)), found.group(2))


def seal(record: dict[str, Any], seq: int, prev: str) -> bytes:
    """One audit line (without newline): the record between its `seq` and `prev`."""
    return orjson.dumps({"event": "audit", "seq": seq, **record, "prev": prev})


@dataclass(frozen=True)
class Report:
    """What `verify` found: `problem` is None when the chain is intact."""

    lines: int  # audit lines read
    head: Head  # the chain's head as the file has it
    problem: str | None = None
    line_number: int | None = None  # the file line (1-based) the problem is at
    note: str | None = None  # not a failure, worth saying (lines past the published head)


@dataclass(frozen=True)
class _Line:
    number: int
    raw: bytes
    seq: int | None
    prev: str | None


def _audit_lines(lines: Iterable[bytes]) -> Iterable[_Line]:
    for number, raw in enumerate(lines, 1):
        raw = raw.rstrip(b"\r\n")
        if b'"audit"' not in raw:
            continue  # another stream's line; removal of an audit line breaks the chain
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            yield _Line(number, raw, None, None)
            continue
        if not isinstance(record, dict) or record.get("event") != "audit":
            continue
        seq, prev = record.get("seq"), record.get("prev")
        yield _Line(
            number,
            raw,
            seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
            prev if isinstance(prev, str) else None,
        )


def verify(read: Callable[[], Iterable[bytes]], head: Head | None = None) -> Report:
    """Check the chain of the lines `read()` yields (it is called twice: the first pass
    notes which sequence numbers exist, to tell reordered lines from removed ones).

    With `head`, also check that no line at or before the head was removed or altered at
    the end of the file. Reports the first problem, with its file line number.
    """
    present = {line.seq for line in _audit_lines(read()) if line.seq is not None}
    expected, prev_hash, before = 1, GENESIS, None
    at_head: tuple[int, str] | None = None
    count = 0
    for line in _audit_lines(read()):
        if line.seq is None or line.prev is None:
            return _broken(count, prev_hash, line.number, "altered: not a well-formed audit line")
        if line.seq > expected:
            if expected in present:
                what = f"reordered: seq {line.seq} comes before seq {expected}"
            else:
                last = f"-{line.seq - 1}" if line.seq - 1 > expected else ""
                what = f"removed: the audit line(s) with seq {expected}{last} before it are gone"
            return _broken(count, prev_hash, line.number, what)
        if line.seq < expected:
            what = f"reordered or repeated: seq {line.seq} comes after seq {expected - 1}"
            return _broken(count, prev_hash, line.number, what)
        if line.prev != prev_hash:
            if before is None:
                what = "altered: the first audit line does not start the chain"
                return _broken(count, prev_hash, line.number, what)
            what = f"altered: its hash is not what the next audit line (line {line.number}) holds"
            return _broken(count, prev_hash, before, what)
        count, expected, before = line.seq, line.seq + 1, line.number
        prev_hash = line_hash(line.raw)
        if head is not None and line.seq == head.lines:
            at_head = (line.number, prev_hash)
    found = Head(count, prev_hash)
    if head is None:
        return Report(count, found)
    if count < head.lines:
        missing = head.lines - count
        return Report(
            count,
            found,
            f"removed: the file ends at audit line {count}, the published head says"
            f" {head.lines}; the last {missing} audit line(s) are gone",
            before,
        )
    if at_head is not None and at_head[1] != head.hash:
        return Report(count, found, "altered: its hash is not the published head's", at_head[0])
    note = (
        f"{count - head.lines} audit line(s) after the published head ({head.lines}):"
        " checked by the chain only"
        if count > head.lines
        else None
    )
    return Report(count, found, None, None, note)


def _broken(count: int, prev_hash: str, number: int, what: str) -> Report:
    return Report(count, Head(count, prev_hash), what, number)
