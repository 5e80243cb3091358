"""structlog set-up: JSON lines or console, with redaction as the last step.

The pipeline is: contextvars (request id) -> level, timestamp -> exception text ->
renderer -> redaction. Redaction runs on the rendered line, after everything else, so a
secret is removed wherever it ended up: in an event field, a message, or a traceback.
The standard library's loggers (uvicorn, hvac, urllib3) go through the same pipeline.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from proxy.config.settings import LoggingSettings
from proxy.masking.secrets import SecretRegistry

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _dumps(event: EventDict, **_: Any) -> str:
    return orjson.dumps(event, default=repr).decode("utf-8")


def _redactor(secrets: SecretRegistry) -> Processor:
    def redact(_logger: WrappedLogger, _method: str, line: Any) -> Any:
        if isinstance(line, str):
            return secrets.redact(line)
        return line

    return redact


def configure_logging(
    settings: LoggingSettings, secrets: SecretRegistry, stream: TextIO | None = None
) -> None:
    """Configure structlog and the standard library's logging once, for the process."""
    out = stream or sys.stdout
    use_console = settings.format == "console" or (settings.format == "auto" and out.isatty())
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=False)
        if use_console
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not use_console:
        shared.append(structlog.processors.format_exc_info)
    level = _LEVELS[settings.level]
    structlog.configure(
        processors=[*shared, renderer, _redactor(secrets)],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
                _redactor(secrets),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's access log would be a second, unmasked line per request; ours is the one.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # urllib3 at debug logs every Vault URL; hvac's paths are not secret but it is noise.
    for noisy in ("urllib3", "httpcore", "httpx", "hpack"):
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))
    # botocore and boto3 at debug log request and response bodies: the secret's value.
    for sdk in ("botocore", "boto3"):
        logging.getLogger(sdk).setLevel(max(level, logging.INFO))
    # The Azure SDK's network trace logs whole answers (the secret) and the Authorization
    # header at DEBUG; its HTTP logging policy logs every URL at INFO.
    for sdk in ("azure", "msal"):
        logging.getLogger(sdk).setLevel(max(level, logging.WARNING))
