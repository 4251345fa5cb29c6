"""Secrets kept out of everything traintel shows or writes: key names and URL credentials.

No torch, no pydantic: the config, the sinks and the error messages all use it.

**Secret names.** A key is normalised (lower-cased, every character but a letter or a digit
dropped, then any trailing digits: ``API-Key``, ``api_key``, ``apiKey`` and ``api.key`` all become
``apikey``; ``password2`` becomes ``password``). It names a secret when the normalised key is, or ends
with, one of ``SECRET_NAMES``::

    password passwd pwd passphrase secret secrets token credential credentials
    auth authorization cookie cookies sessionid sessid apikey apikeys
    accesskey secretkey privatekey signingkey encryptionkey masterkey hmackey sessionkey
    authkey accountkey licensekey subscriptionkey sharedkey

(so ``db_password``, ``github_token``, ``client_secret``, ``aws_secret_access_key``, ``basic_auth``,
``Set-Cookie``, ``JSESSIONID``), unless it is one of ``NOT_SECRET_NAMES``, a tokenizer's tokens:
``padtoken eostoken bostoken unktoken septoken clstoken masktoken`` (``pad_token``, ``eos_token``).

Everything else stays visible, in particular a name with more after the secret word: ``tokenizer``,
``max_tokens``, ``eos_token_id``, ``token_type``, ``sort_key``, and the paths of secrets
(``password_file``, ``private_key_path``, ``secret_dir``): a path is not the secret.

**URLs.** In any string, ``scheme://user:password@host`` becomes ``scheme://***@host`` (all of the
userinfo, also a user alone, which is often a token), and a query or fragment parameter with a
secret name keeps its name only (``?access_token=***``). A string that is one URL (a setting's
value, valid or not) goes through ``redact_url_value``, which needs no scheme and no particular
characters: everything before its last ``@`` goes (``bob:p@ss'w@host`` -> ``***@host``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

REDACTED = "***"
"""What a secret is replaced with."""

SECRET_NAMES = (
    "password", "passwd", "pwd", "passphrase", "secret", "secrets", "token", "credential", "credentials",
    "auth", "authorization", "cookie", "cookies", "sessionid", "sessid", "apikey", "apikeys",
    "accesskey", "secretkey", "privatekey", "signingkey", "encryptionkey", "masterkey", "hmackey",
    "sessionkey", "authkey", "accountkey", "licensekey", "subscriptionkey", "sharedkey",
)  # fmt: skip
"""A key names a secret when its normalised form (``_normal``) is, or ends with, one of these."""

NOT_SECRET_NAMES = frozenset(
    {"padtoken", "eostoken", "bostoken", "unktoken", "septoken", "clstoken", "masktoken"}
)
"""Normalised keys that end with a secret name but are a tokenizer's tokens, not secrets."""

_NOT_ALNUM = re.compile(r"[^a-z0-9]+")


def _normal(name: str) -> str:
    """``name`` lower-cased, without its separators and trailing digits (``API_Key_2`` -> ``apikey``)."""
    return _NOT_ALNUM.sub("", name.lower()).rstrip("0123456789")


def is_secret_key(name: object) -> bool:
    """Whether a key with this name holds a secret (see the module's docstring for the rule)."""
    if not isinstance(name, str):
        return False
    normal = _normal(name)
    return normal.endswith(SECRET_NAMES) and normal not in NOT_SECRET_NAMES


# scheme://[userinfo@]rest; userinfo runs to the last "@" before the first "/", "?", "#" or space,
# as urllib, requests and httpx split it. Quotes and angle brackets end a URL inside a message.
_URL = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?:(?P<userinfo>[^/?#\s'\"<>]*)@)?(?P<rest>[^\s'\"<>]*)"
)
_PARAM = re.compile(r"(?P<sep>[?&;#])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s]*)")


def _redact_params(rest: str) -> str:
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if cut < 0:
        return rest

    def param(m: re.Match[str]) -> str:
        if is_secret_key(unquote(m["name"])) and m["value"]:
            return f"{m['sep']}{m['name']}={REDACTED}"
        return m[0]

    return rest[:cut] + _PARAM.sub(param, rest[cut:])


def redact_url(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``.

    ``postgresql://u:p@db/x`` -> ``postgresql://***@db/x``; ``https://h/?token=abc&page=2`` ->
    ``https://h/?token=***&page=2``. Text without URLs comes back unchanged.
    """
    if "://" not in text:
        return text

    def url(m: re.Match[str]) -> str:
        userinfo = "" if m["userinfo"] is None else f"{REDACTED}@"
        return f"{m['scheme']}{userinfo}{_redact_params(m['rest'])}"

    return _URL.sub(url, text)


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/+")


def redact_url_value(value: str) -> str:
    """``value``, one URL, with its credentials replaced by ``***`` whatever its shape.

    Everything between the scheme (``http://``, if any) and the last ``@`` is the credentials, so a
    URL without a scheme (``bob:pw@host:1``) and a password holding ``@``, ``:``, ``/``, ``#``,
    quotes or spaces are hidden too (``http://***@host``); secret query parameters as in
    ``redact_url``. A ``@`` elsewhere (a path's) hides more than it must: never less.
    """
    scheme = _SCHEME.match(value)
    start = 0 if scheme is None else scheme.end()
    _, at, rest = value[start:].rpartition("@")
    return f"{value[:start]}{REDACTED + at if at else ''}{_redact_params(rest)}"


def has_redacted_url(text: str) -> bool:
    """Whether ``text`` holds a URL whose credentials ``redact_url`` replaced (``scheme://***@host``,
    ``?token=***``): such a value cannot be used as it is."""
    for m in _URL.finditer(text):
        if m["userinfo"] == REDACTED:
            return True
        params = _PARAM.finditer(m["rest"])
        if any(p["value"] == REDACTED and is_secret_key(unquote(p["name"])) for p in params):
            return True
    return False


def _secret_pair(name: object, value: object) -> bool:
    return value is not None and is_secret_key(name)


def redact(data: Any) -> Any:
    """A copy of ``data`` (nested dicts, lists and tuples) safe to show.

    * the value of a key that names a secret becomes ``***`` (unless it is null), whatever it holds;
    * ``{name: <secret name>, value: ...}`` (Kubernetes-style) and ``[<secret name>, value]`` pairs
      (HTTP headers as a list) have their value replaced the same way;
    * every other string goes through ``redact_url``.
    """
    if isinstance(data, Mapping):
        name = data.get("name", data.get("key"))
        hidden = "value" in data and _secret_pair(name, data["value"])
        out = {}
        for k, v in data.items():
            if _secret_pair(k, v) or (hidden and k == "value"):
                out[k] = REDACTED
            else:
                out[k] = redact(v)
        return out
    if isinstance(data, list | tuple):
        if len(data) == 2 and isinstance(data[0], str) and _secret_pair(data[0], data[1]):
            items = [data[0], REDACTED]
        else:
            items = [redact(v) for v in data]
        return items if isinstance(data, list) else tuple(items)
    if isinstance(data, str):
        return redact_url(data)
    return data
