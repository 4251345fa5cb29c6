"""Secrets kept out of everything traintel shows or writes: key names and URL credentials.

No torch, no pydantic: the config, the sinks and the error messages all use it.

**Secret names.** A key is split into lower-case words at ``_``, ``-``, ``.``, spaces and camelCase
(``secretKey`` -> ``secret key``, ``X-API-Key`` -> ``x api key``). It names a secret when

* one of its words is, or ends with, ``password``, ``passwd``, ``pwd``, ``passphrase``, ``secret``,
  ``secrets``, ``token``, ``credential``, ``credentials``, ``cookie``, ``cookies``, ``authorization``,
  ``apikey``, ``sessionid``, ``sessid`` (so ``dbpassword``, ``githubtoken``, ``JSESSIONID`` too);
* its last word is ``auth`` (``auth``, ``basic_auth``; not ``auth_type`` or ``auth_url``);
* a ``key``/``keys`` word follows ``api``, ``access``, ``secret``, ``private``, ``signing``,
  ``encryption``, ``auth``, ``master``, ``session``, ``account``, ``license``, ``subscription``,
  ``shared`` or ``hmac`` (``api_key``, ``secretKey``, ``private-key``), or a word ends with one of
  those joined to ``key`` (``apikey``, ``accesskey``, ``privatekey``);
* a ``session`` word is followed by ``id`` (``session_id``, ``sessionId``).

Not secrets: ``key`` alone and other ``..._key`` (``sort_key``, ``label_key``, ``cache_key``), words
that merely contain a secret word (``tokenizer``, ``max_tokens``, ``monkey``, ``keyboard``), a
tokenizer's tokens (``token`` after ``pad``, ``eos``, ``bos``, ``unk``, ``sep``, ``cls``, ``mask``,
``special``, ``start``, ``end``: ``pad_token``, ``eos_token_id``), and names of files and paths (last
word ``file``, ``path``, ``filename``, ``dir``, ``directory``, ``location``: ``keyfile``,
``password_file``, ``private_key_path``): a path is not the secret.

**URLs.** In any string, ``scheme://user:password@host`` becomes ``scheme://***@host`` (all of the
userinfo, also a user alone, which is often a token), and a query or fragment parameter with a
secret name keeps its name only (``?access_token=***``). A string that is one URL (a setting's
value, valid or not) goes through ``redact_url_value``, which needs no scheme and no particular
characters: everything before its last ``@`` goes (``bob:p@ss'w@host`` -> ``***@host``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote

REDACTED = "***"
"""What a secret is replaced with."""

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_SECRET_WORD = re.compile(
    r"(?:password|passwd|pwd|passphrase|secrets?|token|credentials?|cookies?|authorization|sessionid"
    r"|sessid|(?:api|access|secret|private|signing|encryption|auth|master|session|account|license"
    r"|subscription|shared|hmac)keys?)$"
)
_KEY_QUALIFIERS = frozenset(
    {"api", "access", "secret", "private", "signing", "encryption", "auth", "master", "session"}
    | {"account", "license", "subscription", "shared", "hmac"}
)
_TOKENIZER_WORDS = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "start", "end"})
_PATH_WORDS = frozenset({"file", "path", "filename", "dir", "directory", "location"})


def _words(name: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(name)]


def _secret_word(words: Sequence[str], i: int) -> bool:
    word = words[i]
    before = words[i - 1] if i else ""
    after = words[i + 1] if i + 1 < len(words) else ""
    if word == "token" and before in _TOKENIZER_WORDS:
        return False
    return (
        _SECRET_WORD.search(word) is not None
        or (word in ("key", "keys") and before in _KEY_QUALIFIERS)
        or (word == "session" and after == "id")
    )


def is_secret_key(name: object) -> bool:
    """Whether a key with this name holds a secret (see the module's docstring for the rule)."""
    if not isinstance(name, str):
        return False
    words = _words(name)
    if not words or words[-1] in _PATH_WORDS:
        return False
    return words[-1] == "auth" or any(_secret_word(words, i) for i in range(len(words)))


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
