"""Masking and redaction: the last processor removes every secret the process knows."""

from __future__ import annotations

import io
import json
import logging

import structlog

from proxy.config.settings import LoggingSettings
from proxy.masking.secrets import SecretRegistry, mask
from proxy.records.log_setup import configure_logging

SECRET = "pk_live_9f8e7d6c5b4a39281706"


def test_mask_shows_only_the_last_four() -> None:
    """A key is shown as *** plus its last 4 characters, short values as *** alone."""
    assert mask(SECRET) == "***1706"
    assert mask("short") == "***"
    assert mask(None) is None


def test_registry_redacts_every_occurrence() -> None:
    """Every known secret is replaced wherever it appears, longest first."""
    secrets = SecretRegistry()
    secrets.add(SECRET)
    secrets.add(SECRET[:12])
    secrets.add("abc")  # too short to be a secret: ignored
    text = f"a={SECRET} b={SECRET}x c={SECRET[:12]} d=abc"
    assert secrets.redact(text) == f"a=***1706 b=***1706x c={mask(SECRET[:12])} d=abc"
    assert SECRET not in repr(secrets)


def test_final_processor_redacts_fields_messages_and_tracebacks() -> None:
    """At debug level, a secret in an event field, a stdlib message or a traceback is
    redacted in the rendered line."""
    secrets = SecretRegistry()
    out = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    configure_logging(LoggingSettings(format="json", level="debug"), secrets, out)
    try:
        secrets.add(SECRET)
        log = structlog.get_logger("test.redaction")
        log.debug("field", key=SECRET, nested={"deep": [SECRET]})
        logging.getLogger("some.library").warning("message with %s", SECRET)
        try:
            raise RuntimeError(f"boom {SECRET}")
        except RuntimeError:
            log.exception("failed")
    finally:
        structlog.reset_defaults()
        root.handlers[:], root.level = saved_handlers, saved_level
    text = out.getvalue()
    assert SECRET not in text
    assert text.count("***1706") >= 4
    lines = [json.loads(line) for line in text.splitlines()]
    assert {line["event"] for line in lines} >= {"field", "failed"}
    assert any("Traceback" in line.get("exception", "") for line in lines)
