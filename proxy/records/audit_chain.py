"""The audit log's hash chain: sealing a line, and verifying a file, as pure functions.

Each audit line is one JSON object with `"event": "audit"`, a sequence number `seq`
(1, 2, 3 ...) and `prev`, the SHA-256 of the previous audit line's bytes (64 zeros for
the first). Altering a line changes its hash, which the next line recorded; removing or
reordering lines breaks the sequence. Only the last lines can go unnoticed by the chain
alone: the *head* (the line count and the last line's hash), published where the log's
writer cannot rewrite it later, closes that gap.

The chain runs on across rotated files: the first line of a new file is a *link* line
(`"chain": "continued"`) whose `seq` and `prev` continue the previous file's head, so the
files read in order are one chain. A line cut short by a crash is set aside at the next
start by a *torn* line (`"chain": "torn_tail_set_aside"`) naming its file line and bytes.

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


CONTINUED = "continued"
TORN = "torn_tail_set_aside"


def link_record(time: str, after: Head) -> dict[str, Any]:
    """The record of a file's first line when it continues the chain ending at `after`."""
    return {"time": time, "chain": CONTINUED, "continues": str(after)}


def torn_record(time: str, line: int, size: int) -> dict[str, Any]:
    """The record that sets aside a last line of `size` bytes at file line `line`, cut short."""
    return {"time": time, "chain": TORN, "torn_line": line, "torn_bytes": size}


@dataclass(frozen=True)
class Report:
    """What `verify` found: `problem` is None when the chain is intact."""

    lines: int  # the last audit line's seq (lines in the chain so far)
    head: Head  # the chain's head as the files have it
    problem: str | None = None
    line_number: int | None = None  # the file line (1-based) the problem is at
    note: str | None = None  # not failures, worth saying (one per line of text)
    file: str = ""  # the file the problem is in


@dataclass(frozen=True)
class _Line:
    number: int
    raw: bytes
    seq: int | None
    prev: str | None
    chain: str | None = None
    torn_line: int | None = None


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
        seq, prev, torn = record.get("seq"), record.get("prev"), record.get("torn_line")
        chain = record.get("chain")
        yield _Line(
            number,
            raw,
            seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
            prev if isinstance(prev, str) else None,
            chain if isinstance(chain, str) else None,
            torn if isinstance(torn, int) and not isinstance(torn, bool) else None,
        )


Source = tuple[str, Callable[[], Iterable[bytes]]]


def verify(read: Callable[[], Iterable[bytes]], head: Head | None = None) -> Report:
    """Check the chain of the lines `read()` yields; see `verify_files`."""
    return verify_files([("", read)], head)


def verify_files(sources: list[Source], head: Head | None = None) -> Report:
    """Check the chain across `sources` (name, read), oldest first, as one chain: each
    file's first line must continue the previous file's last. `read` is called twice (the
    first pass notes which sequence numbers exist, to tell reordered lines from removed
    ones, and which cut-short lines were set aside).

    The first file may begin with a link line (its earlier files were not given: a note,
    not a failure). With `head`, also check that no line at or before the head was
    removed or altered at the end. Reports the first problem, with its file and line.
    """
    present: set[int] = set()
    torn_marked: set[tuple[int, int]] = set()
    for index, (_name, read) in enumerate(sources):
        for line in _audit_lines(read()):
            if line.seq is not None:
                present.add(line.seq)
            if line.chain == TORN and line.torn_line is not None:
                torn_marked.add((index, line.torn_line))
    notes: list[str] = []
    expected, prev_hash = 1, GENESIS
    started = False
    before: tuple[str, int] | None = None  # the last audit line: file, line number
    first_seq: int | None = None
    at_head: tuple[str, int, str] | None = None
    count = 0
    last_name, last_lines = "", 0

    def broken(name: str, number: int, what: str) -> Report:
        return Report(count, Head(count, prev_hash), what, number, _notes(notes), name)

    for index, (name, read) in enumerate(sources):
        raw_lines = list(read())
        last_name, last_lines = name, len(raw_lines)
        where = f"{name} " if name else ""
        if raw_lines and not raw_lines[-1].endswith(b"\n") and raw_lines[-1].strip():
            number = len(raw_lines)
            if (index, number) not in torn_marked:
                return broken(
                    name,
                    number,
                    f"torn: the last line is cut short ({len(raw_lines[-1])} bytes, no line"
                    " end), as a crash in the middle of a write leaves it; the proxy sets it"
                    " aside when it next starts",
                )
        file_first = True
        for line in _audit_lines(raw_lines):
            if line.seq is None or line.prev is None:
                if (index, line.number) in torn_marked:
                    notes.append(
                        f"{where}line {line.number}: a line cut short by a crash"
                        f" ({len(line.raw)} bytes) was set aside by the proxy at its next start"
                    )
                    continue
                return broken(name, line.number, "altered: not a well-formed audit line")
            if not started and line.chain == CONTINUED and line.seq > 1:
                # The earlier files of this chain were not given: begin where this one does.
                expected, prev_hash = line.seq, line.prev
                notes.append(
                    f"{where}line {line.number}: the chain begins at seq {line.seq}, continuing"
                    " earlier files that were not given; give them too to check them"
                )
            started = True
            if file_first and index > 0 and line.seq == 1 and line.prev == GENESIS and count:
                what = (
                    f"not linked: a new chain starts at seq 1 here, where the previous file"
                    f" ended at seq {count}; these files are not one chain"
                )
                return broken(name, line.number, what)
            file_first = False
            if line.seq > expected:
                if expected in present:
                    what = f"reordered: seq {line.seq} comes before seq {expected}"
                else:
                    last = f"-{line.seq - 1}" if line.seq - 1 > expected else ""
                    what = (
                        f"removed: the audit line(s) with seq {expected}{last} before it are gone"
                    )
                return broken(name, line.number, what)
            if line.seq < expected:
                what = f"reordered or repeated: seq {line.seq} comes after seq {expected - 1}"
                return broken(name, line.number, what)
            if line.prev != prev_hash:
                if before is None:
                    what = "altered: the first audit line does not start the chain"
                    return broken(name, line.number, what)
                what = (
                    f"altered: its hash is not what the next audit line ({where}line"
                    f" {line.number}) holds"
                )
                return broken(before[0], before[1], what)
            if first_seq is None:
                first_seq = line.seq
            count, expected, before = line.seq, line.seq + 1, (name, line.number)
            prev_hash = line_hash(line.raw)
            if head is not None and line.seq == head.lines:
                at_head = (name, line.number, prev_hash)
    found = Head(count, prev_hash)
    if head is None:
        return Report(count, found, note=_notes(notes))
    if count < head.lines:
        missing = head.lines - count
        if before is None:
            return Report(
                count,
                found,
                f"removed: there are no audit lines, the published head says {head.lines};"
                f" all {missing} are gone (give the rotated files too, oldest first)",
                last_lines + 1,
                _notes(notes),
                last_name,
            )
        return Report(
            count,
            found,
            f"removed: the chain ends at audit line {count}, the published head says"
            f" {head.lines}; the last {missing} audit line(s) are gone",
            before[1],
            _notes(notes),
            before[0],
        )
    if at_head is not None and at_head[2] != head.hash:
        return Report(
            count,
            found,
            "altered: its hash is not the published head's",
            at_head[1],
            _notes(notes),
            at_head[0],
        )
    if at_head is None and head.lines and (first_seq is None or head.lines < first_seq):
        notes.append(
            f"the published head (seq {head.lines}) is in an earlier file that was not given;"
            " only its count was checked"
        )
    if count > head.lines:
        notes.append(
            f"{count - head.lines} audit line(s) after the published head ({head.lines}):"
            " checked by the chain only"
        )
    return Report(count, found, None, None, _notes(notes))


def _notes(notes: list[str]) -> str | None:
    return "\n".join(notes) if notes else None
