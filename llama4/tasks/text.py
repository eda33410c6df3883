"""Text helpers the verifiers share: normalisation, number and answer extraction.

The rules are deliberately few and written down, so a score can be explained:

* :func:`normalize`: Unicode NFKC (full-width digits and letters become ASCII), case folded,
  punctuation and symbols dropped, runs of whitespace made one space, ends stripped.
* :func:`integers`: every integer written in the reply, in order, in any script's decimal
  digits (Arabic-Indic, Devanagari, full-width...), with an optional minus sign (``-`` or
  ``−``) and optional thousands separators (``1,234,567``, ``1 234 567``, ``1.234.567`` where
  every group has three digits). A decimal such as ``3.5`` is no integer: it yields nothing.
* :func:`strip_wrapping`: a reply's answer without the wrapping people add: surrounding
  quotes, backticks or ``**``, a leading label of up to three words such as ``Answer:``, a
  trailing full stop.
"""

from __future__ import annotations

import re
import unicodedata

_WS = re.compile(r"\s+")
_NUMBER = re.compile(
    r"(?<![\w.,])([-−]?)(\d{1,3}(?:([,.\u00a0\u202f ])\d{3})(?:\3\d{3})*|\d+)(?![\w]|[.,]\d)"
)
_QUOTES = "\"'`“”„‘’«»‹›「」『』"
# a label is at most three words before a colon: "Answer:", "**Translation**:", "In French:"
_LABEL = re.compile(r"^\s*(?:\*\*)?\w+(?: \w+){0,2}(?:\*\*)?\s*[:：](?:\*\*)?\s*(?=\S)")


def normalize(s: str) -> str:
    """NFKC, casefold, drop punctuation/symbols, collapse whitespace."""
    s = unicodedata.normalize("NFKC", s).casefold()
    s = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in s)
    return _WS.sub(" ", s).strip()


def squash_ws(s: str) -> str:
    """Whitespace runs made one space, ends stripped (nothing else changed)."""
    return _WS.sub(" ", s).strip()


def integers(s: str) -> list[int]:
    """The integers written in ``s``, in order (see the module docstring)."""
    out = []
    for m in _NUMBER.finditer(s):
        sign, body = m.group(1), m.group(2)
        digits = "".join(str(unicodedata.digit(c)) for c in body if c.isdigit())
        value = int(digits)
        out.append(-value if sign else value)
    return out


def strip_wrapping(reply: str, final_stop: bool = True) -> str:
    """The reply without surrounding quotes/backticks/bold markers, a leading ``Label:`` and
    (with ``final_stop``) a final full stop; peeled until nothing changes."""
    s = reply.strip()
    for _ in range(4):  # e.g. **Answer:** "text".
        before = s
        m = _LABEL.match(s)
        if m and "\n" not in s[: m.end()]:
            s = s[m.end():].strip()
        if final_stop:
            s = s.rstrip(".。").strip()
        if len(s) >= 2 and s[0] in _QUOTES and s[-1] in _QUOTES:
            s = s[1:-1].strip()
        s = s.strip("`*").strip()
        if s == before:
            break
    return s


def drop_intro(reply: str) -> str:
    """The reply without a first line that only introduces the answer ("Here it is:"): a
    first line ending with a colon, when more lines follow."""
    lines = reply.strip().splitlines()
    if len(lines) > 1 and lines[0].rstrip().endswith((":", "：")):
        return "\n".join(lines[1:]).strip()
    return reply.strip()
