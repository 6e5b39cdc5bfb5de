"""Job ids: the rule, and a streaming check of a whole manifest's ids.

An id becomes a file name (``images/<shard>/<id>.png``), so it must be a plain, unambiguous,
portable name: ASCII letters, digits, ``.``, ``_``, ``-``; 1 to 128 characters; not only dots.
Everything else is refused, which rules out path separators, ``..``, NUL and other controls,
and every Unicode trick: NFC/NFKC lookalikes (``é`` composed or not, fullwidth ``ａ``),
bidi overrides, zero-width characters. The rule is applied in C (Arrow's RE2, ASCII classes)
over the whole column and in Python (:func:`is_safe_id`) for single ids; tests check they agree.

:class:`IdChecker` takes the id column batch by batch: it keeps the first offending rows of
each kind and one 64-bit hash per id (8 bytes a row), then finds duplicates by sorting the
hashes and confirms them on the strings in a second pass, so a million-row manifest costs
megabytes, not the whole column plus a hash table of strings.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ID_MAX_CHARS = 128
ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_ONLY_DOTS = r"^\.+$"
MAX_LISTED = 20  # rows named per problem in an error message
ID_RULE = (
    "allowed: letters, digits, '.', '_', '-', at most 128 characters, not only dots; ASCII only"
)


def is_safe_id(value: object) -> bool:
    """The id rule for one value (``fullmatch``: a trailing newline is not allowed)."""
    return (
        isinstance(value, str)
        and re.fullmatch(r"[A-Za-z0-9._-]{1,128}", value) is not None
        and value.strip(".") != ""
    )


def unsafe_mask(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """True where an id breaks the rule (nulls are reported separately: false here)."""
    pattern_ok = pc.fill_null(pc.match_substring_regex(ids, ID_PATTERN.pattern), True)
    only_dots = pc.fill_null(pc.match_substring_regex(ids, _ONLY_DOTS), False)
    return pc.or_(pc.invert(pattern_ok), only_dots)


def shown_id(value: str | None, limit: int = 200) -> str:
    """An id as a message shows it: ``repr()``, or ``ascii()`` when the id holds characters
    that look like others (``'cafe\\u0301'``, fullwidth ``'\\uff41'``); long ids are cut."""
    if value is None:
        return "None"
    cut = f"... ({len(value)} characters)" if len(value) > limit else ""
    value = value[:limit]
    plain = unicodedata.normalize("NFKC", value) == value and value.isprintable()
    return (repr(value) if plain else ascii(value)) + cut


class _Listed:
    """The first MAX_LISTED rows of one kind of problem, and how many there were."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, str | None]] = []
        self.count = 0

    def add_mask(self, mask: pa.Array, offset: int, ids: pa.Array) -> None:
        """Rows where `mask` is true, `offset` being the row number of mask[0]."""
        count = pc.sum(mask).as_py() or 0
        room = MAX_LISTED - len(self.rows)
        if room > 0 and count:
            first = pc.indices_nonzero(mask).slice(0, room).to_pylist()
            self.rows += [(offset + i, ids[i].as_py()) for i in first]
        self.count += count

    def add(self, rows: list[int], values: Callable[[int], str | None]) -> None:
        for row in rows:
            self.count += 1
            if len(self.rows) < MAX_LISTED:
                self.rows.append((row, values(row)))

    def describe(self) -> str:
        named = [f"row {row} ({shown_id(value)})" for row, value in self.rows]
        more = f" and {self.count - MAX_LISTED} more" if self.count > MAX_LISTED else ""
        return ", ".join(named) + more


class IdChecker:
    """Feed id batches in manifest order with :meth:`add`, then call :meth:`problems` with a
    way to read the ids again (only needed when some hash repeats)."""

    def __init__(self) -> None:
        self.rows = 0
        self.missing, self.unsafe = _Listed(), _Listed()
        self._hashes: list[np.ndarray] = []

    def add(self, ids: pa.Array | pa.ChunkedArray) -> None:
        ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        ids = ids.cast(pa.string())
        offset = self.rows
        self.rows += len(ids)
        self.missing.add_mask(pc.is_null(ids), offset, ids)
        self.unsafe.add_mask(unsafe_mask(ids), offset, ids)
        values = ids.to_pylist()
        # hash() of a str is a 64-bit SipHash, stable within this process: all we need.
        self._hashes.append(np.fromiter((hash(v) for v in values), np.int64, len(values)))

    def problems(self, reread: Callable[[], Iterator[pa.Array]]) -> list[str]:
        problems = []
        if self.missing.count:
            problems.append(f"missing id at {self.missing.describe()}")
        if self.unsafe.count:
            problems.append(f"unsafe id ({ID_RULE}) at {self.unsafe.describe()}")
        duplicated = self._duplicates(reread)
        if duplicated.count:
            problems.append(f"duplicate id at {duplicated.describe()}")
        return problems

    def _duplicates(self, reread: Callable[[], Iterator[pa.Array]]) -> _Listed:
        """Rows whose id occurs more than once (null ids are not duplicates of each other)."""
        listed = _Listed()
        hashes = np.concatenate(self._hashes) if self._hashes else np.empty(0, np.int64)
        self._hashes = []
        ordered = np.sort(hashes)
        repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        if not len(repeated):
            return listed
        del ordered
        candidates = np.isin(hashes, repeated)
        seen: dict[str, list[int]] = {}  # only the few ids whose hash repeats
        offset = 0
        for batch in reread():
            values = batch.cast(pa.string()).to_pylist()
            for index in np.flatnonzero(candidates[offset : offset + len(values)]):
                value = values[index]
                if value is not None:
                    seen.setdefault(value, []).append(offset + int(index))
            offset += len(values)
        rows = sorted(row for found in seen.values() if len(found) > 1 for row in found)
        value_of = {row: value for value, found in seen.items() for row in found}
        listed.add(rows, value_of.get)
        return listed
