"""A hosted teacher's credential: a key from an environment variable, Azure Key Vault or a workspace
connection, or a Microsoft Entra ID token. Every value resolved is registered with `azdistill.secrets`, so
it is masked wherever it could be printed."""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional

from azdistill.errors import UserError
from azdistill.secrets import header_value, looks_like_variable_name, redact

if TYPE_CHECKING:  # pragma: no cover
    from azdistill.config.teacher import TeacherConfig


ENTRA_SCOPES = {
    "azure_openai": "https://cognitiveservices.azure.com/.default",
    "serverless": "https://cognitiveservices.azure.com/.default",
    "online_endpoint": "https://ml.azure.com/.default",
    "openai-compatible": "https://cognitiveservices.azure.com/.default",
}
# Refresh an Entra token this long before it expires, so no request goes out with a token about to lapse.
TOKEN_REFRESH_MARGIN_S = 300


class Credential:
    """Produces the authentication headers of each request (a fixed key, or an Entra token refreshed in time).

    The key, and each token when it arrives, is checked by `header_value`: a value a header cannot carry is refused
    with an error naming `source`; `fix` says how to mend it (e.g. "export it again without it").
    """

    def __init__(
        self, kind: str, key: Optional[str] = None, token_provider: Optional[Callable[[], tuple[str, float]]] = None,
        source: str = "", fix: str = "",
    ):
        self.kind = kind
        self.source = source  # where the key came from, for messages; never the key itself
        self._fix = fix
        if key is not None:
            key = header_value(key, f"the key in {source or 'the credential'}", fix or "set it again without it")
        self._key = key
        self._token_provider = token_provider
        self._token: Optional[str] = None
        self._expires_on = 0.0
        self._lock = threading.Lock()

    @property
    def is_token(self) -> bool:
        return self._token_provider is not None

    def secret(self) -> Optional[str]:
        """The key or a valid token (None when the endpoint needs no authentication)."""
        if self._token_provider is None:
            return self._key
        with self._lock:
            if self._token is None or time.time() > self._expires_on - TOKEN_REFRESH_MARGIN_S:
                token, self._expires_on = self._token_provider()
                self._token = header_value(
                    token, f"the {self.source or 'token'}", self._fix or "sign in again (az login) or check the identity azure-identity uses"
                )
            return self._token

    def __repr__(self) -> str:  # never show the value, even in a traceback's locals
        return f"Credential({self.kind}, from {self.source or 'nowhere'})"


def resolve_credential(teacher: "TeacherConfig", azure: object = None, environ: Optional[dict] = None) -> Credential:
    """Find the teacher's key (or set up Entra tokens) as its `auth` section says. Errors name the setting to fix."""
    environ = os.environ if environ is None else environ
    auth = teacher.auth
    method = auth.method
    if method == "none":
        return Credential("none", source="no authentication")
    if method == "api_key_env":
        name = auth.api_key_env or ""
        value = environ.get(name)
        if value is None or not value.strip():
            # The name is shown only when it looks like a variable's: a short key typed in its place would pass the
            # config's checks (it is a valid name) and land in this error line, and from there in CI logs.
            if looks_like_variable_name(name):
                problem = f"the environment variable {name} is not set (or empty); export the teacher's key in it"
            else:
                problem = (
                    "the environment variable it names is not set (or empty); the name is not shown, as it does not look like "
                    "one (UPPER_CASE) and may be a key typed in its place: give the NAME of the variable holding the key"
                )
            raise UserError(
                f"teacher.auth.api_key_env: {problem}, or choose another teacher.auth.method (key_vault, workspace_connection, entra)"
            )
        return Credential("key", key=value, source=f"environment variable {name}", fix="export it again without it")
    if method == "key_vault":
        return Credential(
            "key", key=_key_vault_secret(auth.key_vault_url, auth.key_vault_secret), source=f"Key Vault secret {auth.key_vault_secret}",
            fix="store the secret again without it",
        )
    if method == "workspace_connection":
        return Credential(
            "key", key=_connection_key(auth, azure, environ), source=f"workspace connection {auth.connection}",
            fix="save the connection's key again without it",
        )
    if method == "entra":
        scope = auth.scope or ENTRA_SCOPES.get(teacher.kind, ENTRA_SCOPES["azure_openai"])
        return Credential("entra", token_provider=_entra_token_provider(scope), source=f"Entra ID token for {scope}")
    raise UserError(f"teacher.auth.method: unknown method {method!r}")  # pragma: no cover - the config rejects it


def _first_line(error: Exception) -> str:
    """The first line of an error's message, masked (azure-identity's messages run to a dozen lines, or are empty)."""
    lines = redact(str(error)).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _azure_credential():
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError:
        raise UserError("teacher.auth needs the azure-identity package: pip install azure-identity") from None
    # Interactive browser login cannot work in a job or a CI run; the other sources (environment, managed
    # identity, Azure CLI, ...) are tried in order.
    return DefaultAzureCredential(exclude_interactive_browser_credential=True)


def _entra_token_provider(scope: str) -> Callable[[], tuple[str, float]]:
    credential = _azure_credential()

    def provide() -> tuple[str, float]:
        try:
            token = credential.get_token(scope)
        except Exception as error:  # azure-identity raises several types; all mean "no token"
            raise UserError(f"teacher.auth.method entra: no Microsoft Entra ID token for {scope}: {_first_line(error)}") from None
        return token.token, float(token.expires_on)

    return provide


def _key_vault_secret(vault_url: Optional[str], name: Optional[str]) -> str:
    try:
        from azure.keyvault.secrets import SecretClient
    except ImportError:
        raise UserError("teacher.auth.method key_vault needs the azure-keyvault-secrets package: pip install azure-keyvault-secrets") from None
    try:
        secret = SecretClient(vault_url=vault_url, credential=_azure_credential()).get_secret(name)
    except Exception as error:
        raise UserError(
            f"teacher.auth: cannot read secret '{name}' from Key Vault {vault_url}: {_first_line(error)} "
            f"(the identity running this needs the 'Key Vault Secrets User' role on the vault)"
        ) from None
    if not (secret.value or "").strip():
        raise UserError(f"teacher.auth: Key Vault secret '{name}' in {vault_url} is empty")
    return secret.value


def _workspace_scope(auth, azure: object, environ) -> tuple[str, str, str]:
    """Subscription, resource group and workspace of the connection: the auth section, the config's azure
    section, or the variables Azure ML sets inside a job, in that order."""
    scope = []
    for field, azure_field, variable in (
        ("subscription_id", "subscription_id", "AZUREML_ARM_SUBSCRIPTION"),
        ("resource_group", "resource_group", "AZUREML_ARM_RESOURCEGROUP"),
        ("workspace", "workspace", "AZUREML_ARM_WORKSPACE_NAME"),
    ):
        value = getattr(auth, field, None) or getattr(azure, azure_field, None) or environ.get(variable)
        if not value:
            raise UserError(
                f"teacher.auth.{field}: needed to find workspace connection '{auth.connection}'; set it in the config "
                f"(or run inside an Azure ML job, which sets {variable})"
            )
        scope.append(value)
    return scope[0], scope[1], scope[2]


def _connection_key(auth, azure: object, environ) -> str:
    try:
        from azure.ai.ml import MLClient
    except ImportError:
        raise UserError("teacher.auth.method workspace_connection needs the azure-ai-ml package: pip install azure-ai-ml") from None
    subscription, group, workspace = _workspace_scope(auth, azure, environ)
    try:
        client = MLClient(_azure_credential(), subscription, group, workspace)
        connection = client.connections.get(auth.connection, populate_secrets=True)
    except Exception as error:
        raise UserError(
            f"teacher.auth: cannot read workspace connection '{auth.connection}' of workspace {workspace}: "
            f"{_first_line(error)}"
        ) from None
    key = getattr(connection, "api_key", None) or getattr(getattr(connection, "credentials", None), "key", None)
    if not (key or "").strip():
        raise UserError(
            f"teacher.auth: workspace connection '{auth.connection}' holds no API key (it may use Entra ID: "
            f"set teacher.auth.method: entra)"
        )
    return key
