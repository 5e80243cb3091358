"""Where keys come from: one module per kind of source, behind one small interface.

    vault.py   Vault or OpenBao KV (hvac), the default
    aws.py     AWS Secrets Manager (boto3, an optional extra, imported only when used)
    azure.py   Azure Key Vault (Microsoft's SDK, an optional extra, imported only when used)
    files.py   a file, re-read when it changes (Kubernetes and Docker secrets)
    env.py     an environment variable or a .env file, read once

Every source turns a credential's settings into a `KeySource` (base.py): `read()` gives
the key and its version or raises SourceError. What happens around reads (refresh,
staleness, rotation logs) is the same for all of them, in proxy/keys/store.py.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping

from proxy.config.settings import (
    AnyCredential,
    AwsCredentialSettings,
    AzureCredentialSettings,
    EnvCredentialSettings,
    FileCredentialSettings,
)
from proxy.keys.sources.base import KeySource
from proxy.masking.secrets import SecretRegistry

AWS_EXTRA = "pip install 'publer-proxy[aws]'"
AZURE_EXTRA = "pip install 'publer-proxy[azure]'"
AZURE_MODULES = ("azure.keyvault.secrets", "azure.identity")


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # a parent package is missing too
        return True


def sdk_problems(credentials: Mapping[str, AnyCredential]) -> list[str]:
    """Config lines for credentials whose source needs a library that is not installed."""
    problems: list[str] = []
    for name, cred in credentials.items():
        if isinstance(cred, AwsCredentialSettings) and importlib.util.find_spec("boto3") is None:
            problems.append(
                f"credentials.{name}.source: aws_secrets_manager needs the AWS SDK, which is"
                f" not installed: {AWS_EXTRA}"
            )
        if isinstance(cred, AzureCredentialSettings) and any(map(_missing, AZURE_MODULES)):
            problems.append(
                f"credentials.{name}.source: azure_key_vault needs Microsoft's Azure SDK"
                f" (azure-keyvault-secrets, azure-identity), which is not installed: {AZURE_EXTRA}"
            )
    return problems


def describe(credential: AnyCredential) -> str:
    """Where a credential's key is read, from its settings alone (nothing is read)."""
    if isinstance(credential, AwsCredentialSettings):
        field = f" field {credential.field}" if credential.field else ""
        region = f" in {credential.region}" if credential.region else ""
        return f"aws_secrets_manager {credential.secret_id}{field}{region}"
    if isinstance(credential, AzureCredentialSettings):
        version = f" version {credential.version}" if credential.version else ""
        return (
            f"azure_key_vault {credential.vault_url}/secrets/{credential.secret_name}{version}"
            f" as {credential.credential.type}"
        )
    if isinstance(credential, FileCredentialSettings):
        return f"file {credential.path} (readable by {credential.readable_by})"
    if isinstance(credential, EnvCredentialSettings):
        dotenv = f", else {credential.env_file}" if credential.env_file else ""
        return f"env ${credential.variable}{dotenv}"
    version = f"KV v{credential.kv_version}"
    return f"vault {credential.mount}/{credential.path} field {credential.field} ({version})"


def make_source(
    credential: AnyCredential, secrets: SecretRegistry, vault: Callable[[], object]
) -> KeySource:
    """The source of one credential; `vault()` gives the shared Vault session, made once."""
    if isinstance(credential, AwsCredentialSettings):
        from proxy.keys.sources.aws import AwsKeySource

        return AwsKeySource(credential, secrets)
    if isinstance(credential, AzureCredentialSettings):
        from proxy.keys.sources.azure import AzureKeySource

        return AzureKeySource(credential, secrets)
    if isinstance(credential, FileCredentialSettings):
        from proxy.keys.sources.files import FileKeySource

        return FileKeySource(credential, secrets)
    if isinstance(credential, EnvCredentialSettings):
        from proxy.keys.sources.env import EnvKeySource

        return EnvKeySource(credential, secrets)
    from proxy.keys.outbound import import_requests

    import_requests()  # before hvac imports it
    from proxy.keys.sources.vault import VaultKeySource, VaultSession

    session = vault()
    assert isinstance(session, VaultSession)
    return VaultKeySource(session, credential)
