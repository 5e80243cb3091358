"""A local AWS Secrets Manager for tests: moto's standalone server, as a process.

It speaks the real wire protocol, so boto3 runs unchanged against it with
`endpoint_url`. `auth=True` makes it check signatures against the IAM users it holds
(after the first few calls, which set up the secret, the user and its policy), so a
wrong secret access key is refused as AWS would refuse it. It keeps everything in
memory: after `restart` the caller creates its secrets again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx

from tests.bao import free_port

REGION = "eu-west-1"
START_TIMEOUT_SECONDS = 60.0
# With auth on, this many calls go unchecked: create_secret, create_user,
# create_access_key, put_user_policy (see `setup_reader`).
SETUP_CALLS = 4
ADMIN = {"aws_access_key_id": "AKIAADMINEXAMPLE0000", "aws_secret_access_key": "admin-secret"}


@dataclass
class Moto:
    """A running `moto_server` and how to reach it."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    auth: bool
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)

    def client(self, service: str) -> Any:
        """A boto3 client for `service` with the admin's (unchecked) credentials."""
        if service not in self._clients:
            self._clients[service] = boto3.client(
                service, endpoint_url=self.url, region_name=REGION, **ADMIN
            )
        return self._clients[service]

    def create_secret(self, name: str, value: str) -> str:
        """Create a secret with a string value; its ARN."""
        arn: str = self.client("secretsmanager").create_secret(Name=name, SecretString=value)["ARN"]
        return arn

    def rotate(self, name: str, value: str) -> str:
        """Put a new value: a new version becomes AWSCURRENT; its VersionId."""
        answer = self.client("secretsmanager").put_secret_value(SecretId=name, SecretString=value)
        version: str = answer["VersionId"]
        return version

    def setup_reader(self) -> dict[str, str]:
        """An IAM user allowed GetSecretValue only; its access key as environment variables.

        moto checks the action of a policy, not its Resource (it asks about "*"), so the
        policy names "*" here; the key sources page's policy names the one secret's ARN."""
        iam = self.client("iam")
        iam.create_user(UserName="publer-proxy")
        key = iam.create_access_key(UserName="publer-proxy")["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": "*"}
            ],
        }
        iam.put_user_policy(
            UserName="publer-proxy", PolicyName="read-key", PolicyDocument=json.dumps(policy)
        )
        return {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }

    def stop(self) -> None:
        """Terminate the server and wait for it."""
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_moto(workdir: Path, *, port: int | None = None, auth: bool = False) -> Moto:
    """`python -m moto.server` on a free loopback port (or `port`), once it answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = workdir / f"moto-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(SETUP_CALLS)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    moto = Moto(f"http://127.0.0.1:{port}", port, process, log_path, auth)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            httpx.get(f"{moto.url}/moto-api/", timeout=1, trust_env=False)
            return moto
        except httpx.HTTPError:
            time.sleep(0.1)
    moto.stop()
    raise RuntimeError(f"moto did not start; its log:\n{log_path.read_text()[-2000:]}")


def restart_moto(moto: Moto) -> Moto:
    """Stop `moto` if it runs and start an empty one on the same port."""
    moto.stop()
    return start_moto(moto.log_path.parent, port=moto.port, auth=moto.auth)
