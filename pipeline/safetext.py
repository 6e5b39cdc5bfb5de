"""Showing untrusted text (ids, URIs, error messages) on a terminal without letting it act.

Manifests come from anywhere, and their strings end up in logs, tables and error messages. Two
things must not happen there:

- control and format characters acting on the terminal: ANSI escapes (clear the screen, fake
  colours, OSC 8 links), carriage returns and newlines (forged log lines), bidi overrides and
  zero-width characters (text that reads differently from what it is);
- Rich markup inside the text being interpreted (``[red]``, ``[link=...]``) or, for an
  unbalanced ``[/]``, raising ``MarkupError`` and crashing the command after the run.

:func:`printable` escapes the first kind as ``\\x1b`` / ``\\u202e`` (plain text is returned
unchanged); :func:`for_console` also escapes Rich markup, for strings embedded in markup.
"""

from __future__ import annotations

import logging
import unicodedata

from rich.markup import escape

# Unicode categories that do not print: controls, format (bidi, zero-width), surrogates,
# private use, unassigned, line and paragraph separators.
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
MAX_SHOWN = 300  # characters of one untrusted string shown in a message


def printable(text: object, limit: int | None = None) -> str:
    """`text` with every non-printing character escaped; optionally cut to `limit` chars."""
    value = str(text)
    if limit is not None and len(value) > limit:
        value = f"{value[:limit]}... ({len(value)} characters)"
    if value.isascii() and value.isprintable():
        return value
    return "".join(_escape_char(ch) for ch in value)


def _escape_char(ch: str) -> str:
    if ch == " " or unicodedata.category(ch) not in HIDDEN_CATEGORIES:
        return ch
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def for_console(text: object, limit: int | None = MAX_SHOWN) -> str:
    """Safe to embed in a Rich markup string: escaped controls and escaped markup."""
    return escape(printable(text, limit))


class PrintableLogFilter(logging.Filter):
    """Escapes non-printing characters in every log message (ids and URIs come from users)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = printable(message)
        if safe != message:
            record.msg, record.args = safe, ()
        return True
