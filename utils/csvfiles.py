"""The one reader of the challenge's CSV files: label files (`Train.csv`) and submissions / truth files.

Format: `name,value[,subject]` per row (the official `Train.csv`: `Image_0000.png,0.0,0`, no header, CRLF line
ends). LF line ends, a UTF-8 byte-order mark and blank lines are accepted. The first row is a header only if it does
not look like a data row: its first field is not an image file name and its second is not a number
(`name,percentage,subject` is a header; `Image_0000.png,abc,0` is a data row with a bad value, reported as such).
Every problem is a `CsvError` naming the file and the line (= row number: blank lines count, as in an editor).
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

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


def read_name_value_rows(path: str | os.PathLike, value_name: str = "value", example: str = "Image_0000.png,12.0",
                         allow_subject: bool = True, value_range: tuple[float, float] = (0.0, 100.0),
                         range_hint: str = "percentages lie in 0..100") -> NameValueRows:
    """Parse and check a `name,value[,subject]` file: the same column count on every row, a non-empty name, a
    number in `value_range` (NaN never is) as value, no name twice."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the path of the CSV file")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = [(line, [field.strip() for field in row]) for line, row in enumerate(csv.reader(handle), start=1)
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
        if not name:
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
