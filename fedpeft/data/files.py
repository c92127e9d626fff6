"""Local data files (csv, jsonl, json, parquet): read, or refused in one line that says why.

``datasets`` reads the files; what it would report as a traceback from deep inside its
builders (an empty file, a binary one, a broken JSON line) is checked here first, naming
the file and the line.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import datasets

from fedpeft.config import ScenarioError

# file suffix -> the ``datasets`` builder that reads it
LOCAL_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HEADER_LINES = {".csv": 1, ".jsonl": 0}  # formats where each non-blank line is a row


def read_local_file(path: Path) -> datasets.Dataset:
    """All rows of a local csv, jsonl, json or parquet file, as one split.

    A file that cannot be read (missing, empty, binary, not UTF-8, a broken JSON line, a
    csv with only its header) is one error line naming the file and, where known, the line.
    """
    if path.suffix not in LOCAL_SUFFIXES or not path.is_file():
        raise ScenarioError(
            f"data file not found: {path} (expected an existing {'/'.join(LOCAL_SUFFIXES)} file)"
        )
    kind = LOCAL_SUFFIXES[path.suffix]
    if path.stat().st_size == 0:
        raise ScenarioError(f"data file {path} is empty")
    if kind != "parquet":
        _check_text(path)
    try:
        with _datasets_errors_hidden():
            rows = datasets.load_dataset(kind, data_files=str(path))["train"]
    except ValueError as err:
        # what datasets raises for a file that parsed to no rows at all
        if "corresponds to no data" not in str(err):
            raise _unreadable(path, err) from None
        rows = None
    except Exception as err:  # noqa: BLE001 - datasets wraps every reader's error its own way
        raise _unreadable(path, err) from None
    if rows is None or len(rows) == 0:
        header = " (only a header)" if kind == "csv" else ""
        raise ScenarioError(f"data file {path} has no data rows{header}")
    return rows


def row_name(path: Path, row: int, rows: int) -> str:
    """``row N (line L)`` for 0-based ``row`` of a file of ``rows`` rows.

    Just ``row N`` where its line is not known: a json file, or a csv whose quoted fields
    span lines.
    """
    header = HEADER_LINES.get(path.suffix)
    if header is None or not path.is_file():
        return f"row {row + 1}"
    with path.open("rb") as f:
        lines = [number for number, raw in enumerate(f, 1) if raw.strip()]
    if len(lines) - header != rows:
        return f"row {row + 1}"
    return f"row {row + 1} (line {lines[row + header]})"


def _check_text(path: Path) -> None:
    """Refuse a csv or json file that is not UTF-8 text, naming the first bad line.

    A JSON lines file is also parsed line by line, so its broken line is named
    (``datasets`` reports only a byte position).
    """
    kind = path.suffix[1:]
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if b"\0" in raw:
                raise ScenarioError(
                    f"data file {path} is binary, not {kind} text (a NUL byte on line {number})"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ScenarioError(
                    f"data file {path} is binary or not UTF-8 text: line {number} holds byte "
                    f"0x{raw[err.start]:02x}; save it as UTF-8 {kind}"
                ) from None
            if path.suffix == ".jsonl" and line.strip():
                _check_json_line(path, number, line)


def _check_json_line(path: Path, number: int, line: str) -> None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ScenarioError(
            f"data file {path}: line {number} is not JSON ({err.msg}, column {err.colno})"
        ) from None
    if not isinstance(row, dict):
        raise ScenarioError(
            f'data file {path}: line {number} is not a JSON object ({{"column": value, ...}})'
        )


def _unreadable(path: Path, err: BaseException) -> ScenarioError:
    """One line from the reader's own error, not from the wrapper ``datasets`` puts around it."""
    while (inner := err.__cause__ or err.__context__) is not None:
        err = inner
    reason = (str(err).splitlines() or [type(err).__name__])[0]
    return ScenarioError(f"data file {path} cannot be read as {path.suffix[1:]}: {reason}")


@contextlib.contextmanager
def _datasets_errors_hidden() -> Iterator[None]:
    """Keep ``datasets``' own error log lines off the console: the caller reports the error."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
