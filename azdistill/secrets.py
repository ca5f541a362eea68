"""Keeping secrets out of everything we write: spotting them, registering them, masking them.

A key is never a literal in a config, a command line, a log line, an MLflow param or an output file (the config
names where to find it; `teachers/credentials.py` resolves it). Every secret value resolved is registered here, so
`redact()` can scrub it from any text that came back from an endpoint (some servers echo headers in error
bodies) and the logging filter can scrub it from log lines as a last line of defence. Libraries seldom print a
value as it is: requests shows a refused header through repr() (escapes), servers echo it inside JSON, URLs
percent-encode it; so each registered value is masked in every one of those forms, and so is each line of it.
A key an HTTP header cannot carry (a line break, a control character, a character outside ASCII) is refused
when it is read, naming where it came from and never what it holds.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import unicodedata
from typing import Optional

from azdistill.errors import UserError

log = logging.getLogger(__name__)


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names a config key might have if someone tried to put the key itself in the config.
SECRET_KEY_NAMES = {
    "api_key", "apikey", "api-key", "key", "secret", "password", "token", "access_token", "client_secret",
    "bearer", "authorization", "subscription_key", "access_key",
}
SECRET_PREFIXES = ("sk-", "bearer ", "eyj", "basic ")  # OpenAI keys, Authorization values, JWTs (base64 '{"')


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


def holds_secret(key: str) -> bool:
    """Whether a config key holds or names a secret (api_key, api_key_env, key_vault_secret, token, password, ...): what
    is given for it is never repeated in an error, as a key typed there by mistake may be too short to look like one."""
    lowered = key.lower()
    words = set(re.split(r"[_.\-]", lowered))
    return lowered in SECRET_KEY_NAMES or bool(words & {"key", "apikey", "secret", "password", "token", "bearer", "authorization", "credential"})


def looks_like_variable_name(name: str) -> bool:
    """Whether `name` may be printed as a variable's name: UPPER_CASE words (OPENAI_API_KEY), not something that
    could be a key typed where the name belongs (abc123xyz, Hy7Tq2Wz: valid names, too short for looks_like_secret)."""
    return bool(re.fullmatch(r"_?[A-Z][A-Z0-9_]*", name)) and ("_" in name or name.isalpha()) and not looks_like_secret(name)


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




_known: set[str] = set()
_forms: list[str] = []  # every form of every registered value, longest first (a form may hold a shorter one)
_known_lock = threading.Lock()
MASK = "***"
# A piece of a value this long or longer (a line of a multi-line key, the part before a character a library
# printed its own way) is masked on its own; shorter pieces would mask ordinary words.
MIN_PIECE = 6
# An Authorization value, a key header or a key query parameter, masked even when the value was never registered
# (a token minted by a library, a key of another tool): `Bearer x`, `api-key: x`, `'api-key': 'x'`, `api_key=x`.
_AUTHORIZATION = re.compile(
    r"(?i)(\b(?:bearer|basic)\s+|\b(?:api[-_]?key|x-api-key|ocp-apim-subscription-key|authorization)['\"]?\s*[:=]\s*['\"]?(?!bearer\s|basic\s))"
    r"(?!\*\*\*)[^\s'\"<>,;&]{8,}"
)


def _printed(value: str) -> set[str]:
    """`value` as libraries print it: repr() and ascii() with either quote escaped (repr escapes `'` only when the
    whole text holds both quotes), JSON with and without ASCII escapes, percent-encoded (upper and lower case hex,
    `+` or `%20` for a space), the repr of its UTF-8 bytes, and its UTF-8 read as Latin-1."""
    forms = {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    for quoted in (repr(value + '"')[1:-2], ascii(value + '"')[1:-2], repr(value.encode("utf-8") + b'"')[2:-2]):
        forms |= {quoted, quoted.replace("\\'", "'")}
    from urllib.parse import quote, quote_plus

    for encoded in (quote(value, safe=""), quote(value), quote_plus(value)):
        forms |= {encoded, re.sub(r"%[0-9A-F]{2}", lambda match: match.group().lower(), encoded)}
    forms.add(value.encode("utf-8").decode("latin-1"))
    return forms


def _pieces(value: str) -> set[str]:
    """The lines of a multi-line value, and the runs between characters a library may print its own way (controls,
    spaces, quotes, backslashes, anything outside ASCII): what is left to mask if the whole never shows."""
    return {piece for piece in re.split(r"[^\x21-\x7e]+|['\"\\]+", value) if len(piece) >= MIN_PIECE and piece != value}


def register_secret(value: Optional[str]) -> None:
    """Remember a secret value so `redact()` and the logging filter remove it wherever it shows up, in every form a
    library prints it (see `_printed`): as is, escaped by repr() or JSON, percent-encoded, each of its lines."""
    if not value or len(value) < 4:
        return
    with _known_lock:
        known = value in _known
    _install_log_filter()  # again: a handler added since the value was first registered gets the filter too
    if known:
        return
    forms = set()
    for form in _printed(value):
        forms |= _printed(form)  # one form inside another: the repr() of a key echoed in a JSON error body
    for piece in _pieces(value):
        forms |= _printed(piece)
    with _known_lock:
        _known.add(value)
        _forms[:] = sorted(set(_forms) | {form for form in forms if len(form) >= 4}, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every registered secret, in each of its forms, and anything shaped like an Authorization value masked."""
    if not text:
        return text
    with _known_lock:
        forms = list(_forms)
    for form in forms:
        if form in text:
            text = text.replace(form, MASK)
    return _AUTHORIZATION.sub(lambda match: match.group(1) + MASK, text)


class RedactingFilter(logging.Filter):
    """Masks registered secrets in every log record that passes through the handler it is attached to."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _known:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: logging reports it when the handler formats it
            message = None
        if message is not None:
            cleaned = redact(message)
            if cleaned != message:
                record.msg, record.args = cleaned, None
        # Filters run before the formatter, which would render the traceback (and the key in its message) itself;
        # rendered here, the formatter reuses the masked text.
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_filter = RedactingFilter()


def _install_log_filter() -> None:
    # Handler filters see records from every logger that propagates to them; a filter on a logger would
    # only see that logger's own records.
    for handler in logging.getLogger().handlers:
        if _filter not in handler.filters:
            handler.addFilter(_filter)




_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _flaw(value: str) -> Optional[tuple[str, int]]:
    """What in `value` no key holds and an HTTP header cannot carry, in words that show no character of it, and its
    1-based position; None when there is nothing."""
    for position, char in enumerate(value, 1):
        if char in _LINE_BREAKS:
            flaw = "a line break"
        elif char == "\t":
            flaw = "a tab"
        elif char == "\x00":
            flaw = "a NUL character"
        elif unicodedata.category(char).startswith("C"):  # Cc control, Cf format (zero-width space), Co, Cn, Cs
            flaw = "a control character"
        elif char.isspace():
            flaw = "a space"
        elif not char.isascii():
            flaw = "a character outside ASCII"
        else:
            continue
        return flaw, position
    return None


def header_value(value: str, subject: str, fix: str) -> str:
    """`value` (a key or token) as it goes into a header: the whitespace around it removed, with a note; refused
    with a one-line `UserError` naming `subject` (where it came from, e.g. "the key in environment variable X") and
    `fix`, never the value, if anything else in it is what no key holds.

    Whitespace around a key is removed rather than refused: a line break at its end is what `echo key > file`,
    `$(< key.txt)` of a file saved with Windows line ends, or a copy from a web page leave, and no key starts or ends
    with a space. Inside the key, a line break, a tab, a NUL or any other control or format character (Unicode
    category C), any whitespace, and any character outside ASCII are refused: HTTP header values cannot carry control
    characters (requests refuses the header and prints it, key and all, through repr()), http.client encodes headers
    as Latin-1 and fails with a traceback on anything beyond it, and no provider issues keys with anything but
    printable ASCII, so even a Latin-1 letter such as é is a paste gone wrong (the endpoint would answer 401).
    """
    register_secret(value)  # masked everywhere even if refused here
    stripped = value.strip()
    if stripped != value:
        log.info("teacher.auth: removed the whitespace around %s (a line break at its end, say)", subject)
        register_secret(stripped)
    if not stripped:
        raise UserError(f"teacher.auth: {subject} is empty; {fix}")
    flaw = _flaw(stripped)
    if flaw is not None:
        what, position = flaw
        why = {"a space": "which no key has", "a character outside ASCII": "which no key has (pasted in with it?)"}.get(
            what, "which an HTTP header cannot carry"
        )
        raise UserError(f"teacher.auth: {subject} holds {what} (character {position + len(value) - len(value.lstrip())}), {why}; {fix}")
    return stripped
