"""The one writer and the one reader of every CSV file the project writes or reads.

Writing (`format_rows`, `write_rows`, `write_frame`): the csv module's quoting (QUOTE_MINIMAL: a field holding a
comma, a quote or a line break is quoted, its quotes doubled), UTF-8, LF line ends (CRLF where a file mimics the
official `Train.csv`), atomically (utils.files). So any file name the file system allows round-trips through every
CSV the project writes, except one that is not valid UTF-8, which is refused with the reason (`check_text`).

Reading: `read_frame` reads back a table the project wrote (runs' predictions, folds, histories, ...), names as
text exactly as written; `read_name_value_rows` reads the challenge's files: label files (`Train.csv`) and
submissions / truth files.

Challenge format: `name,value[,subject]` per row (the official `Train.csv`: `Image_0000.png,0.0,0`, no header, CRLF
line ends). LF line ends, a UTF-8 byte-order mark and blank lines are accepted; names are taken as written (only the
value and subject fields are stripped of spaces). The first row is a header only if it does not look like a data
row: its first field is not an image file name and its second is not a number (`name,percentage,subject` is a
header; `Image_0000.png,abc,0` is a data row with a bad value, reported as such). Every problem is a `CsvError`
naming the file and the line (= row number: blank lines count, as in an editor); a file that is no UTF-8 text (a
zip, a UTF-16 export, a spreadsheet) is named as such.
"""
from __future__ import annotations

import codecs
import csv
import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from utils import files

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class CsvError(ValueError):
    """A CSV that cannot be read as `name,value[,subject]` rows; the message names the file, the line and the fix."""


def is_number(text: str) -> bool:
    """Whether a CSV field parses as a float."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def looks_like_image_name(text: str) -> bool:
    return text.strip().lower().endswith(IMAGE_EXTENSIONS)


@dataclass
class NameValueRows:
    """Rows of a `name,value[,subject]` file; `lines[i]` is the line row i came from."""

    path: Path
    names: list[str]
    values: list[float]
    subjects: list[str] | None
    lines: list[int]

    def where(self, index: int) -> str:
        return f"{self.path}, row {self.lines[index]}"


# ----------------------------------------------------------------------------------------------- writing


def check_text(text: str, what: str = "file name") -> str:
    """A field must be encodable as UTF-8 (the encoding of every CSV here): a Linux file name of arbitrary bytes may
    not be (Python holds the undecodable bytes as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise CsvError(f"{what} {shown!r} is not valid UTF-8, and the project's CSV files (like the challenge's) are "
                       "UTF-8 text: rename the file") from None
    return text


def format_rows(rows: Iterable[Sequence[Any]], line_end: str = "\n") -> str:
    """Rows as CSV text, quoted as the csv module quotes (QUOTE_MINIMAL)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=line_end)
    for row in rows:
        writer.writerow([check_text(field) if isinstance(field, str) else field for field in row])
    return buffer.getvalue()


def write_rows(path: str | os.PathLike, rows: Iterable[Sequence[Any]], header: Sequence[str] | None = None,
               line_end: str = "\n", record: bool = False) -> Path:
    """Write rows (and a header row when given) atomically; `record`: with an integrity record (utils.files)."""
    text = format_rows([header] if header else [], line_end) + format_rows(rows, line_end)
    return files.write_text(path, text, record=record)


def write_frame(path: str | os.PathLike, frame: pd.DataFrame, record: bool = False) -> Path:
    """A table with its header, no index, read back by `read_frame` (pandas writes through the csv module: the same
    quoting as `write_rows`)."""
    for column in frame.columns:
        if frame[column].dtype == object or pd.api.types.is_string_dtype(frame[column].dtype):
            for value in frame[column]:
                if isinstance(value, str):
                    check_text(value, f"{column} value")
    return files.write_text(path, frame.to_csv(index=False, lineterminator="\n"), record=record)


def read_frame(path: str | os.PathLike, text_columns: Sequence[str] = ("name",)) -> pd.DataFrame:
    """A table written by `write_frame`: `text_columns` as str exactly as written (no "NA" -> NaN, no stripping);
    empty fields of the other columns are NaN."""
    frame = pd.read_csv(path, dtype=dict.fromkeys(text_columns, str), keep_default_na=False,
                        na_values=[""], encoding="utf-8")
    return frame


# ----------------------------------------------------------------------------------------------- reading


def text_rows(path: str | os.PathLike) -> list[tuple[int, list[str]]]:
    """(line, fields) of a UTF-8 CSV; a file that is not UTF-8 text is a CsvError saying what it looks like."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK\x03\x04"):
        raise CsvError(f"{path} is a zip archive, not a CSV: unzip it and pass the CSV inside "
                       "(a submission zip holds predictions.csv)")
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise CsvError(f"{path} is UTF-16 text (a spreadsheet's \"Unicode text\" export): save it as CSV UTF-8")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return [(line, row) for line, row in enumerate(csv.reader(handle), start=1)]
    except UnicodeDecodeError as error:
        raise CsvError(f"{path} is not UTF-8 text (byte {error.start}: {error.object[error.start:error.start + 1]!r}; "
                       "another encoding such as Latin-1, or a binary file): save it as CSV UTF-8") from None
    except csv.Error as error:
        raise CsvError(f"{path} is not a readable CSV ({error}): check its quotes") from None


def read_name_value_rows(path: str | os.PathLike, value_name: str = "value", example: str = "Image_0000.png,12.0",
                         allow_subject: bool = True, value_range: tuple[float, float] = (0.0, 100.0),
                         range_hint: str = "percentages lie in 0..100") -> NameValueRows:
    """Parse and check a `name,value[,subject]` file: the same column count on every row, a non-empty name, a
    number in `value_range` (NaN never is) as value, no name twice."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the path of the CSV file")
    # names as written (a file name may start or end with a space); the other fields without spaces around them
    rows = [(line, [row[0], *(field.strip() for field in row[1:])]) for line, row in text_rows(path)
            if any(field.strip() for field in row)]
    if not rows:
        raise CsvError(f"{path} is empty: expected rows like '{example}'")
    first = rows[0][1]
    if not looks_like_image_name(first[0]) and not (len(first) >= 2 and is_number(first[1])):
        rows = rows[1:]  # a header such as "name,percentage,subject"
        if not rows:
            raise CsvError(f"{path} has a header but no data rows")
    allowed = (2, 3) if allow_subject else (2,)
    columns = len(rows[0][1])
    shape = f"{'name,' + value_name}{'[,subject]' if allow_subject else ''}"
    names, values, subjects, lines = [], [], [], []
    first_line_of: dict[str, int] = {}
    for line, row in rows:
        where = f"{path}, row {line}"
        if len(row) not in allowed or len(row) != columns:
            expected = columns if columns in allowed else " or ".join(map(str, allowed))
            raise CsvError(f"{where}: expected {expected} comma-separated columns ({shape}), got {len(row)}: "
                           f"{','.join(row)!r}; fix that row")
        name, text = row[0], row[1]
        if not name.strip():
            raise CsvError(f"{where}: empty image name; every row must start with a file name like Image_0000.png")
        try:
            value = float(text)
        except ValueError:
            raise CsvError(f"{where}: {value_name} {text!r} of {name!r} is not a number; write e.g. 12.0") from None
        low, high = value_range
        if not (math.isfinite(value) and low <= value <= high):
            raise CsvError(f"{where}: {value_name} {text!r} of {name!r} is not in [{low:g}, {high:g}]; {range_hint}")
        if name in first_line_of:
            raise CsvError(f"{where}: duplicate name {name!r} (first on row {first_line_of[name]}); "
                           "keep one row per slice")
        first_line_of[name] = line
        names.append(name)
        values.append(value)
        lines.append(line)
        if columns == 3:
            subjects.append(row[2])
    return NameValueRows(path, names, values, subjects if columns == 3 else None, lines)
