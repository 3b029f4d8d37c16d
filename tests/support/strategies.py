"""Hypothesis strategies for hostile bytes, JSON documents and strings."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

#: Strings that have hurt parsers, databases and terminals somewhere.
NASTY = [
    "",
    " ",
    "'",
    '"',
    "\\",
    "'; DROP TABLE builds; --",
    '" OR 1=1 --',
    "%s%s%s%n",
    "${jndi:ldap://x}",
    "$(id)",
    "`id`",
    "<script>alert(1)</script>",
    "\x00",
    "a\x00b",
    "\r\n",
    "\u202etxt.exe",
    "\ufeff",
    "Ω≈ç√∫˜µ≤≥÷",
    "𝕳𝖊𝖑𝖑𝖔",
    "🙈🙉🙊",
    "\ud800",  # a lone surrogate: not encodable as UTF-8
    "\udcff",
    "x" * 192,
    "x" * 5000,
    "9" * 5000,
    "build-1/poll/1",
    "sim-1-1-1-p-0000000000000000",
]

nasty_text = st.sampled_from(NASTY) | st.text(max_size=40) | st.text(min_size=150, max_size=300)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | nasty_text
)

json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(nasty_text, inner, max_size=4),
    max_leaves=12,
)


def encode(value: Any) -> bytes:
    """JSON bytes for ``value``; lone surrogates become ``\\udXXX`` escapes, as an attacker's would."""
    return json.dumps(value, ensure_ascii=True).encode()


def mutated(base: dict[str, Any], keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """``base`` with some of ``keys`` replaced by hostile values or removed."""

    def apply(changes: dict[str, Any], drop: list[str]) -> dict[str, Any]:
        doc = {**base, **changes}
        for key in drop:
            doc.pop(key, None)
        return doc

    return st.builds(
        apply,
        st.dictionaries(st.sampled_from(keys), json_values, max_size=len(keys)),
        st.lists(st.sampled_from(keys), max_size=2),
    )


raw_bytes = (
    st.binary(max_size=300)
    | st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b"{}",
            b"\xff\xfe{}",
            b"\xef\xbb\xbf{}",
            b'{"id": "\xff"}',
            b"[" * 100_000,
            b'{"a":' * 5000,
            b"1" * 5000,
            b'{"id": 1' + b"0" * 5000 + b"}",
            b'{"id": "\\ud800"}',
            b"NaN",
            b'{"id": Infinity}',
        ]
    )
    | json_values.map(encode)
)
