"""Cache rules: which requests the cache handles, written `METHOD PATTERN`.

PATTERN is a path (`/v2/models/*/infer`, any origin) or a whole URL without query
(`http://127.0.0.1:8000/v1/embeddings`, that origin only). `*` matches within one path segment,
`**` matches across segments; METHOD may be `*` for any method. The rule's text is its label
(`fp.route`, the counters' route).

>>> rule = Rule.parse("POST /v2/models/*/infer")
>>> rule.matches("POST", "http", "127.0.0.1", 8000, "/v2/models/minilm/infer")
True
>>> rule.matches("POST", "http", "127.0.0.1", 8000, "/v2/models/a/b/infer")
False
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_RULES = (
    "POST /v1/embeddings",
    "POST /v2/models/*/infer",
    "POST /v2/models/*/versions/*/infer",
    "POST /v1/chat/completions",
    "POST /v1/completions",
)

_METHOD = re.compile(r"^(\*|[A-Za-z]+)$")
_URL = re.compile(r"^(?P<scheme>https?)://(?P<host>[^/:]+|\[[^\]]+\])(?::(?P<port>\d+|\*))?(?P<path>/.*)$")
_MODEL_IN_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)")


def _glob_to_regex(glob: str) -> re.Pattern[str]:
    out = []
    index = 0
    while index < len(glob):
        if glob.startswith("**", index):
            out.append(".*")
            index += 2
        elif glob[index] == "*":
            out.append("[^/]*")
            index += 1
        else:
            out.append(re.escape(glob[index]))
            index += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class Rule:
    label: str
    method: str  # upper case, or "*"
    scheme: str | None
    host: re.Pattern[str] | None
    port: int | None
    path: re.Pattern[str]

    @classmethod
    def parse(cls, text: str) -> Rule:
        parts = text.split()
        if len(parts) != 2 or not _METHOD.match(parts[0]):
            raise ValueError(
                f"cache rule {text!r} is not `METHOD PATTERN`; write for example "
                "`POST /v1/embeddings` or `POST http://127.0.0.1:8000/v2/models/*/infer`"
            )
        method, pattern = parts[0].upper(), parts[1]
        label = f"{method} {pattern}"
        if pattern.startswith("/"):
            return cls(label, method, None, None, None, _glob_to_regex(pattern))
        url = _URL.match(pattern)
        if url is None or "?" in pattern:
            raise ValueError(
                f"cache rule {text!r}: the pattern must be a path starting with / or an http(s) URL "
                "without a query, such as http://127.0.0.1:8000/v1/embeddings"
            )
        port_text = url.group("port")
        scheme = url.group("scheme")
        port = None if port_text == "*" else int(port_text or (443 if scheme == "https" else 80))
        host = _glob_to_regex(url.group("host").lower().strip("[]"))
        return cls(label, method, scheme, host, port, _glob_to_regex(url.group("path")))

    def matches(self, method: str, scheme: str, host: str, port: int, path: str) -> bool:
        """Whether a request (path without query) falls under this rule."""
        return (
            (self.method == "*" or self.method == method)
            and (self.scheme is None or self.scheme == scheme)
            and (self.port is None or self.port == port)
            and (self.host is None or self.host.match(host.lower()) is not None)
            and self.path.match(path) is not None
        )


class Rules:
    """An ordered list of rules; the first that matches names the route."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = tuple(rules)
        self._methods = {rule.method for rule in self.rules}

    @classmethod
    def parse(cls, texts: Sequence[str]) -> Rules:
        return cls(Rule.parse(text) for text in texts)

    def match(self, method: str, scheme: str, host: str, port: int, path: str) -> Rule | None:
        if method not in self._methods and "*" not in self._methods:
            return None  # the common case for proxied traffic the cache leaves alone
        for rule in self.rules:
            if rule.matches(method, scheme, host, port, path):
                return rule
        return None


def model_from_path(path: str) -> str | None:
    """The `{name}` of `/v2/models/{name}/...` (KServe v2), else None.

    Bytes that are not UTF-8 (kept by mitmproxy as surrogates) become U+FFFD: the name is a label of
    counters, metrics and logs, which must be able to write it."""
    match = _MODEL_IN_PATH.match(path)
    if match is None:
        return None
    return match.group("name").encode("utf-8", "surrogateescape").decode("utf-8", "replace")
