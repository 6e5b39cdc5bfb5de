"""Which jobs the gallery shows: ranked at build time, worst first, within a fixed budget.

A report has no JavaScript, so "sortable" means ranked when it is written: per ranking (PSNR for
jobs with a reference, final energy for the others, or final energy for all), the worst and the
best jobs. The picker sees the results one batch at a time and keeps, per ranking, only the
`limit` worst and `limit` best rows seen so far (Arrow's select_k), so memory does not grow with
the run. At the end the budget is shared between the rankings; a ranking whose jobs all fit is
shown whole instead of split.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.outputs import STATUS_OK

SORT_MODES = ("psnr", "energy")


@dataclass(frozen=True)
class Ranking:
    label: str  # what is ranked, for titles: "PSNR", "final energy"
    key: str  # result column
    worst_is_high: bool  # energy: high is worst; PSNR: low is worst
    scope: str  # "reference" (psnr not null), "no-reference" (psnr null) or "all"
    scope_text: str  # for titles


@dataclass(frozen=True)
class Section:
    title: str
    rows: list[dict]


def rankings_for(sort: str) -> tuple[Ranking, ...]:
    if sort not in SORT_MODES:
        raise ValueError(f"unknown sort {sort!r} (known: {', '.join(SORT_MODES)})")
    energy_all = Ranking("final energy", "energy", True, "all", "")
    if sort == "energy":
        return (energy_all,)
    return (
        Ranking("PSNR", "psnr", False, "reference", " with a reference"),
        Ranking("final energy", "energy", True, "no-reference", " without a reference"),
    )


class _Kept:
    """The `limit` worst and best rows of one ranking so far, and how many rows it has seen."""

    def __init__(self, ranking: Ranking, limit: int) -> None:
        self.ranking, self.limit = ranking, limit
        self.worst: pa.Table | None = None
        self.best: pa.Table | None = None
        self.count = 0

    def add(self, table: pa.Table) -> None:
        rows = table.filter(self._mask(table))
        if not rows.num_rows:
            return
        self.count += rows.num_rows
        high_first = "descending" if self.ranking.worst_is_high else "ascending"
        low_first = "ascending" if self.ranking.worst_is_high else "descending"
        self.worst = self._top(self.worst, rows, high_first)
        self.best = self._top(self.best, rows, low_first)

    def _mask(self, table: pa.Table) -> pa.Array:
        mask = pc.and_(
            pc.fill_null(pc.equal(table.column("status"), STATUS_OK), False),
            pc.is_valid(table.column(self.ranking.key)),
        )
        if self.ranking.scope == "reference":
            mask = pc.and_(mask, pc.is_valid(table.column("psnr")))
        elif self.ranking.scope == "no-reference":
            mask = pc.and_(mask, pc.is_null(table.column("psnr")))
        return mask

    def _top(self, kept: pa.Table | None, rows: pa.Table, order: str) -> pa.Table:
        both = rows if kept is None else pa.concat_tables([kept, rows])
        keys = [(self.ranking.key, order), ("id", "ascending")]  # ids break ties: stable output
        return both.take(pc.select_k_unstable(both, k=self.limit, sort_keys=keys))

    def sections(self, share: int) -> list[Section]:
        r = self.ranking
        worst = self.worst.to_pylist() if self.worst is not None else []
        best = self.best.to_pylist() if self.best is not None else []
        if self.count <= share:
            title = f"All {self.count} jobs{r.scope_text}, worst {r.label} first"
            if self.count == 1:
                title = f"The one job{r.scope_text}"
            return [Section(title, worst[: self.count])]
        n_worst = (share + 1) // 2
        n_best = share - n_worst
        sections = [Section(f"Worst {n_worst} by {r.label}{r.scope_text}", worst[:n_worst])]
        if n_best:
            sections.append(Section(f"Best {n_best} by {r.label}{r.scope_text}", best[:n_best]))
        return sections


class GalleryPicker:
    """Feed it result batches (scan.py SCAN_SCHEMA); ask it for the sections at the end."""

    def __init__(self, sort: str = "psnr", limit: int = 48) -> None:
        self.limit = max(0, limit)
        self._kept = [_Kept(ranking, self.limit) for ranking in rankings_for(sort)]

    def add(self, table: pa.Table) -> None:
        if not self.limit:  # --gallery 0: summary and failures only
            return
        for kept in self._kept:
            kept.add(table)

    def sections(self) -> list[Section]:
        """Share the budget: small rankings get all their jobs, the rest split what is left."""
        active = sorted((k for k in self._kept if k.count), key=lambda k: k.count)
        shares: dict[int, int] = {}
        remaining = self.limit
        for i, kept in enumerate(active):
            shares[id(kept)] = min(kept.count, max(1, remaining // (len(active) - i)))
            remaining -= shares[id(kept)]
        # Sections in the order the rankings were declared, not by size.
        return [s for k in self._kept if k.count for s in k.sections(shares[id(k)])]
