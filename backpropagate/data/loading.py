"""Load a data set (file, folder, saved or hub data set) into normalized examples.

:func:`collect` reads everything and never raises on bad content: it returns the examples plus
every problem found (file, line, message), which is what the validation report shows.
:func:`load_examples` is the strict front door for training: bad rows raise
DATASET_PARSE_FAILED unless ``skip_bad_rows``, in which case they are skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from backpropagate.data.formats import (
    FORMATS,
    Example,
    Format,
    RowError,
    describe_keys,
    normalize,
    row_format,
)
from backpropagate.data.readers import RawRow, read_source
from backpropagate.errors import BackpropError, ErrorCode

MAX_LINES_SHOWN = 8


class RowIssue(BaseModel):
    """A problem with a row (``line`` set) or with a whole file (``line`` None)."""

    code: str = str(ErrorCode.DATASET_PARSE_FAILED)
    file: str
    line: int | None = None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"


@dataclass
class Collected:
    """Everything read from a data set, good and bad."""

    examples: list[Example] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)
    bad_rows: list[RowIssue] = field(default_factory=list)
    file_errors: list[RowIssue] = field(default_factory=list)


@dataclass
class Loaded:
    """The usable examples of a data set and what was skipped on the way."""

    examples: list[Example]
    formats: dict[str, str]
    skipped: list[RowIssue]


def _lines(lines: list[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:MAX_LINES_SHOWN])
    return shown + (f", ... ({len(lines)} rows)" if len(lines) > MAX_LINES_SHOWN else "")


def _collect_file(source: str, rows: list[RawRow], data_format: str, out: Collected) -> None:
    good = [r for r in rows if r.record is not None]
    for r in rows:
        if r.error:
            out.bad_rows.append(RowIssue(file=source, line=r.line, message=r.error))
    if not good:
        return
    if data_format != "auto":
        fmt: Format = data_format  # type: ignore[assignment]
        stray: list[RawRow] = []
    else:
        by_format: dict[str, list[int]] = {}
        stray = []
        for r in good:
            found = row_format(r.record)  # type: ignore[arg-type]
            if found is None:
                stray.append(r)
            else:
                by_format.setdefault(found, []).append(r.line)
        if not by_format:
            out.file_errors.append(
                RowIssue(
                    code=str(ErrorCode.DATASET_FORMAT_UNSUPPORTED),
                    file=source,
                    message=f"no known format; keys seen: {describe_keys(r.record for r in good)} "
                    f"(lines {_lines([r.line for r in good])}); expected one of: {', '.join(FORMATS)}",
                )
            )
            return
        if len(by_format) > 1:
            parts = "; ".join(f"{f} on lines {_lines(lines)}" for f, lines in by_format.items())
            out.file_errors.append(
                RowIssue(
                    code=str(ErrorCode.DATASET_FORMAT_UNSUPPORTED),
                    file=source,
                    message=f"rows mix formats ({parts}); keys seen: "
                    f"{describe_keys(r.record for r in good)}. Use one format per file.",
                )
            )
            return
        fmt = next(iter(by_format))  # type: ignore[assignment]
    out.formats[source] = fmt
    stray_lines = {r.line for r in stray}
    for r in good:
        if r.line in stray_lines:
            keys = describe_keys([r.record])  # type: ignore[list-item]
            out.bad_rows.append(
                RowIssue(file=source, line=r.line, message=f"row does not look like {fmt} (keys: {keys})")
            )
            continue
        try:
            out.examples.append(normalize(r.record, fmt, source, r.line))  # type: ignore[arg-type]
        except RowError as exc:
            out.bad_rows.append(RowIssue(file=source, line=r.line, message=str(exc)))
    # Keep problems in file order so the first one reported is the first one in the file.
    out.bad_rows.sort(key=lambda i: (i.file, i.line or 0))


def collect(path: str | Path, data_format: str = "auto") -> Collected:
    """Read a data set and sort every row into examples or problems; raises only if it is missing."""
    if data_format != "auto" and data_format not in FORMATS:
        raise BackpropError(
            ErrorCode.DATASET_FORMAT_UNSUPPORTED,
            f"Unknown data format {data_format!r}; expected auto or one of {', '.join(FORMATS)}.",
        )
    out = Collected()
    for source, rows in read_source(path):
        try:
            materialized = list(rows)
        except BackpropError as exc:
            line = exc.details.get("line")
            message = exc.message.removeprefix(f"{source}:{line}: " if line else f"{source}: ")
            out.file_errors.append(RowIssue(code=str(exc.code), file=source, line=line, message=message))
            continue
        except UnicodeDecodeError as exc:
            out.file_errors.append(RowIssue(file=source, message=f"not UTF-8 text ({exc.reason})"))
            continue
        _collect_file(source, materialized, data_format, out)
    return out


def load_examples(path: str | Path, data_format: str = "auto", skip_bad_rows: bool = False) -> Loaded:
    """The examples of a data set for training; raises on bad rows unless asked to skip them."""
    got = collect(path, data_format)
    if got.file_errors:
        first = got.file_errors[0]
        more = (
            f" (and {len(got.file_errors) - 1} more files with problems)" if len(got.file_errors) > 1 else ""
        )
        raise BackpropError(
            ErrorCode(first.code), f"{first}{more}", errors=[i.model_dump() for i in got.file_errors]
        )
    if got.bad_rows and not skip_bad_rows:
        raise bad_rows_error(got.bad_rows)
    if not got.examples:
        skipped = f" ({len(got.bad_rows)} bad rows were skipped)" if got.bad_rows else ""
        raise BackpropError(ErrorCode.DATASET_EMPTY, f"No usable rows in {path}{skipped}.", path=str(path))
    return Loaded(got.examples, got.formats, got.bad_rows)


def bad_rows_error(issues: list[RowIssue]) -> BackpropError:
    """One DATASET_PARSE_FAILED naming the first bad rows (file, line, problem)."""
    shown = "; ".join(str(i) for i in issues[:5])
    more = f" (and {len(issues) - 5} more bad rows)" if len(issues) > 5 else ""
    return BackpropError(
        ErrorCode.DATASET_PARSE_FAILED,
        f"{len(issues)} bad row{'s' if len(issues) != 1 else ''}: {shown}{more}",
        errors=[i.model_dump() for i in issues[:100]],
    )
