"""The teacher's credential: where it comes from, and how it is kept out of everything we write.

A key is never a literal in a config, a command line, a log line, an MLflow param or an output file. The
config names where to find it (an environment variable, an Azure Key Vault secret, an Azure ML workspace
connection) or asks for a Microsoft Entra ID token. Every secret value we resolve is registered here, so
`redact()` can scrub it from any text that came back from an endpoint (some servers echo headers in error
bodies) and the logging filter can scrub it from log lines as a last line of defence.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional

from azdistill.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from azdistill.config import TeacherConfig

log = logging.getLogger(__name__)

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names a config key might have if someone tried to put the key itself in the config.
SECRET_KEY_NAMES = {
    "api_key", "apikey", "api-key", "key", "secret", "password", "token", "access_token", "client_secret",
    "bearer", "authorization", "subscription_key", "access_key",
}
SECRET_PREFIXES = ("sk-", "bearer ", "eyj", "basic ")  # OpenAI keys, Authorization values, JWTs (base64 '{"')
ENTRA_SCOPES = {
    "azure_openai": "https://cognitiveservices.azure.com/.default",
    "serverless": "https://cognitiveservices.azure.com/.default",
    "online_endpoint": "https://ml.azure.com/.default",
    "openai-compatible": "https://cognitiveservices.azure.com/.default",
}
# Refresh an Entra token this long before it expires, so no request goes out with a token about to lapse.
TOKEN_REFRESH_MARGIN_S = 300


def looks_like_secret(value: str) -> bool:
    """Whether a config value looks like a key or token rather than a name (of a variable, secret, connection).

    Names are short words joined by `_`, `-` or `.`; keys are long runs of random letters and digits: Azure
    keys are 32 hex characters or 84 base62 characters, OpenAI keys start with `sk-`, Entra tokens are JWTs.
    """
    text = value.strip()
    lowered = text.lower()
    if lowered.startswith(SECRET_PREFIXES):
        return True
    if re.fullmatch(r"[0-9a-fA-F]{32,}", text):
        return True
    longest_run = max((len(run) for run in re.findall(r"[A-Za-z0-9+/=]+", text)), default=0)
    if longest_run >= 24:
        run = max(re.findall(r"[A-Za-z0-9+/=]+", text), key=len)
        digits = sum(ch.isdigit() for ch in run)
        uppers = sum(ch.isupper() for ch in run)
        lowers = sum(ch.islower() for ch in run)
        # A long run mixing digits with letters of both cases is random, not a word.
        if digits >= 3 and (uppers >= 3 and lowers >= 3 or digits >= 8):
            return True
    return False


def url_carries_secret(url: str) -> bool:
    """Whether a URL holds credentials: a user:password part or a query parameter that carries a key."""
    from urllib.parse import parse_qsl, urlsplit

    parts = urlsplit(url)
    if parts.password or (parts.username and looks_like_secret(parts.username)):
        return True
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name.lower().replace("_", "-") in {"api-key", "key", "code", "sig", "token", "access-token", "subscription-key"}:
            return True
        if looks_like_secret(value):
            return True
    return False


# ---------------------------------------------------------------------------------------------------
# Redaction


_known: set[str] = set()
_known_lock = threading.Lock()
MASK = "***"


def register_secret(value: Optional[str]) -> None:
    """Remember a secret value so `redact()` and the logging filter remove it wherever it shows up."""
    if value and len(value) >= 4:
        with _known_lock:
            _known.add(value)
        _install_log_filter()


def redact(text: str) -> str:
    """`text` with every registered secret (and anything shaped like an Authorization value) masked."""
    if not text:
        return text
    with _known_lock:
        secrets = sorted(_known, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return re.sub(r"(?i)\b(bearer|api-key:?)\s+[A-Za-z0-9._~+/=-]{8,}", r"\1 " + MASK, text)


class RedactingFilter(logging.Filter):
    """Masks registered secrets in every log record that passes through the handler it is attached to."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _known:
            return True
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_filter = RedactingFilter()


def _install_log_filter() -> None:
    # Handler filters see records from every logger that propagates to them; a filter on a logger would
    # only see that logger's own records.
    for handler in logging.getLogger().handlers:
        if _filter not in handler.filters:
            handler.addFilter(_filter)


# ---------------------------------------------------------------------------------------------------
# Credentials


class Credential:
    """Produces the authentication headers of each request (a fixed key, or an Entra token refreshed in time)."""

    def __init__(self, kind: str, key: Optional[str] = None, token_provider: Optional[Callable[[], tuple[str, float]]] = None, source: str = ""):
        self.kind = kind
        self.source = source  # where the key came from, for messages; never the key itself
        self._key = key
        self._token_provider = token_provider
        self._token: Optional[str] = None
        self._expires_on = 0.0
        self._lock = threading.Lock()
        register_secret(key)

    @property
    def is_token(self) -> bool:
        return self._token_provider is not None

    def secret(self) -> Optional[str]:
        """The key or a valid token (None when the endpoint needs no authentication)."""
        if self._token_provider is None:
            return self._key
        with self._lock:
            if self._token is None or time.time() > self._expires_on - TOKEN_REFRESH_MARGIN_S:
                self._token, self._expires_on = self._token_provider()
                register_secret(self._token)
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
        name = auth.api_key_env
        value = environ.get(name or "")
        if not value:
            raise UserError(
                f"teacher.auth.api_key_env: the environment variable {name} is not set (or empty); export the "
                f"teacher's key in it, or choose another teacher.auth.method (key_vault, workspace_connection, entra)"
            )
        return Credential("key", key=value.strip(), source=f"environment variable {name}")
    if method == "key_vault":
        return Credential("key", key=_key_vault_secret(auth.key_vault_url, auth.key_vault_secret), source=f"Key Vault secret {auth.key_vault_secret}")
    if method == "workspace_connection":
        return Credential("key", key=_connection_key(auth, azure, environ), source=f"workspace connection {auth.connection}")
    if method == "entra":
        scope = auth.scope or ENTRA_SCOPES.get(teacher.kind, ENTRA_SCOPES["azure_openai"])
        return Credential("entra", token_provider=_entra_token_provider(scope), source=f"Entra ID token for {scope}")
    raise UserError(f"teacher.auth.method: unknown method {method!r}")  # pragma: no cover - the config rejects it


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
            raise UserError(f"teacher.auth.method entra: no Microsoft Entra ID token for {scope}: {redact(str(error)).splitlines()[0]}") from None
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
            f"teacher.auth: cannot read secret '{name}' from Key Vault {vault_url}: {redact(str(error)).splitlines()[0]} "
            f"(the identity running this needs the 'Key Vault Secrets User' role on the vault)"
        ) from None
    if not secret.value:
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
            f"{redact(str(error)).splitlines()[0]}"
        ) from None
    key = getattr(connection, "api_key", None) or getattr(getattr(connection, "credentials", None), "key", None)
    if not key:
        raise UserError(
            f"teacher.auth: workspace connection '{auth.connection}' holds no API key (it may use Entra ID: "
            f"set teacher.auth.method: entra)"
        )
    return key
