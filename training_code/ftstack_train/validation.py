"""Checks prompt/response JSON Lines training data, streaming it one line at a time.

This is the one definition of a valid training file: the training job, ``ftstack validate`` and
the data-staging Lambda all import it, so it uses only the standard library and never holds more
than one line of a file in memory.
"""

from __future__ import annotations

import json
import os
import re
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Sequence

__all__ = [
    "FIELDS", "MAX_LINE_BYTES", "DataError", "LengthStats", "Problem", "Record", "Report",
    "check_files", "read_records", "scan_lines", "split_chunks", "validate_files", "validate_stream",
]

FIELDS = ("prompt", "response")
"""The string fields every record needs, in the order they are checked."""

MAX_LINE_BYTES = 16 * 1024 * 1024
_READ_BYTES = 1 << 20
"""Longest line accepted as one record. No real record is ~4M tokens, and a minified JSON array is
a single line: the cap stops a multi-gigabyte one from being loaded only to be rejected."""

MAX_LISTED = 20
"""How many problems DataError's message lists before '... and N more problems'."""

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# json.loads turns a lone "\ud83d" escape into a str that cannot be encoded back to UTF-8, which
# only fails later inside the tokenizer.
_SURROGATE = re.compile("[\ud800-\udfff]")
_SCAN_ONCE = json.JSONDecoder().scan_once  # what json.loads' default decoder calls, same settings
_LINE_ENDS = ("\n", "\r\n")
_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
          str: "a string", list: "an array", dict: "an object"}
_ONE_RECORD = '{"prompt": "...", "response": "..."} on its own line'
_ARRAY_FIX = ("the file is a JSON array; write one object per line (JSON Lines), "
              "e.g. jq -c '.[]' data.json > data.jsonl")
_UTF16_FIX = "the file is UTF-16 encoded (as Windows PowerShell writes files); save it as UTF-8"
_EMPTY_FIX = ("has no records (it is empty or every line is blank); "
              'write one JSON object per line with "prompt" and "response"')


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, located precisely enough to fix it."""

    source: str
    """File name or S3 URI, as given."""
    line: int | None
    """1-based line number; None for a problem with the whole file."""
    field: str | None
    """``"prompt"`` or ``"response"`` when one field is at fault, else None."""
    message: str
    """What is wrong and how to fix it."""

    def __str__(self) -> str:
        """Formats as ``source:line: field 'prompt': message``, the form editors and CI link to."""
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        what = self.message if self.field is None else f"field '{self.field}': {self.message}"
        return f"{where}: {what}"


@dataclass(frozen=True)
class Record:
    """One valid training example."""

    prompt: str
    """The input text, non-empty."""
    response: str
    """The target text, non-empty."""
    line: int
    """1-based line number in its source, for tracing a sample back to the data."""


class DataError(ValueError):
    """Raised with one or more problems; str() lists them (the first 20, then 'and N more')."""

    def __init__(self, problems: Sequence[Problem], total: int | None = None) -> None:
        """Keeps ``problems``; ``total`` counts every problem found when only some were kept."""
        self.problems = list(problems)
        self.total = max(len(self.problems), total or 0)
        # The constructor's own arguments, so pickling (e.g. out of a worker process) rebuilds it.
        super().__init__(self.problems, self.total)

    def __str__(self) -> str:
        """Lists the problems one per line, the first MAX_LISTED of them."""
        return _list_problems(self.problems, self.total, MAX_LISTED)


@dataclass(frozen=True)
class LengthStats:
    """Character (code point) lengths of one field over all records."""

    count: int
    """Number of records measured."""
    min: int
    """Shortest length."""
    max: int
    """Longest length."""
    mean: float
    """Average length."""
    p50: int
    """Median by the nearest-rank method, so always a length that occurs."""
    p95: int
    """95th percentile by the nearest-rank method."""


@dataclass(frozen=True)
class Report:
    """The outcome of checking one or more sources without stopping at the first problem."""

    sources: tuple[str, ...]
    """What was checked, in order."""
    records: int
    """Valid records found."""
    bytes: int
    """Bytes read, including blank lines and line endings."""
    prompt_chars: LengthStats | None
    """Prompt lengths; None when there are no records."""
    response_chars: LengthStats | None
    """Response lengths; None when there are no records."""
    problems: tuple[Problem, ...]
    """The first ``max_problems`` problems."""
    problem_count: int
    """Every problem found, including those not kept."""

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return self.problem_count == 0

    def format(self) -> str:
        """Summarises the check for people: counts and length statistics, then any problems."""
        title = ", ".join(self.sources) if len(self.sources) <= 3 else f"{len(self.sources)} files"
        verdict = "OK" if self.ok else _plural(self.problem_count, "problem")
        lines = [f"{title}: {verdict}",
                 f"  records: {self.records:,}",
                 f"  bytes:   {self.bytes:,}"]
        for name, stats in (("prompt chars", self.prompt_chars),
                            ("response chars", self.response_chars)):
            if stats is not None:
                lines.append(f"  {name + ':':<16}{_format_stats(stats)}")
        if self.problem_count:
            lines.append(_list_problems(self.problems, self.problem_count))
        return "\n".join(lines)


def scan_lines(lines: Iterable[bytes], source: str, *, copy: bool = False) -> Iterator[Record | Problem]:
    """Yields a Record or a Problem per non-blank line, then a file-level Problem if all were blank.

    ``lines`` are bytes with or without their endings (a file opened ``'rb'``, or botocore's
    ``iter_lines``) and are consumed lazily. A file that turns out to be a JSON array or UTF-16
    yields one Problem and is read no further: every later line would only repeat it.

    With ``copy``, a valid line yields its bytes (ending kept, a UTF-8 BOM removed) instead of a
    Record: what a copier writes out, with no Record built for it.
    """
    seen_data = False
    for lineno, raw in enumerate(lines, 1):
        if not isinstance(raw, (bytes, bytearray)):
            raise TypeError(f"scan_lines needs lines of bytes, got {type(raw).__name__}; "
                            "open the file in 'rb' mode")
        size = raw.size if raw.__class__ is _LongLine else len(raw)
        if lineno == 1:
            if raw.startswith(_UTF16_BOMS):
                yield Problem(source, lineno, None, _UTF16_FIX)
                return
            if raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM):]
        # isspace() is strip()'s whitespace, without copying the line; "" is blank too.
        if size <= MAX_LINE_BYTES and (not raw or raw.isspace()):
            continue
        if not seen_data:
            seen_data = True
            if raw.lstrip().startswith(b"["):
                yield Problem(source, lineno, None, _ARRAY_FIX)
                return
        checked = _check_line(raw, size, lineno, source)
        if checked.__class__ is Problem:
            yield checked
        else:
            yield raw if copy else Record(checked["prompt"], checked["response"], lineno)
    if not seen_data:
        yield Problem(source, None, None, _EMPTY_FIX)


def read_records(path: str | os.PathLike) -> Iterator[Record]:
    """Streams records from a file; raises DataError on the FIRST problem.

    A file that is missing or unreadable raises DataError too, so callers handle one exception.
    """
    for item in _scan_file(path, os.fspath(path)):
        if isinstance(item, Problem):
            raise DataError([item])
        yield item


def validate_stream(lines: Iterable[bytes], source: str, max_problems: int = 20) -> Report:
    """Checks every line of one stream (e.g. an S3 object's ``iter_lines()``) into a Report."""
    tally = _Tally(max_problems)
    for item in scan_lines(tally.counted(lines), source):
        tally.add(item)
    return tally.report((source,))


def validate_files(paths: Sequence[str | os.PathLike], max_problems: int = 20) -> Report:
    """Checks several files into one Report, counting every problem but keeping ``max_problems``.

    A missing or unreadable path, or a directory, is a Problem naming the path, not an exception.
    """
    if not paths:
        raise ValueError("validate_files needs at least one path")
    tally = _Tally(max_problems)
    sources = [os.fspath(path) for path in paths]
    for path, source in zip(paths, sources):
        for item in _scan_file(path, source, tally.counted):
            tally.add(item)
    return tally.report(sources)


def check_files(paths: Sequence[str | os.PathLike]) -> Report:
    """validate_files for a step that must not go on with bad data: raises DataError listing the
    first problems when there is any, else returns the Report."""
    report = validate_files(paths)
    if not report.ok:
        raise DataError(list(report.problems), report.problem_count)
    return report


class _LongLine(bytes):
    """The start of a line longer than MAX_LINE_BYTES; ``size`` is the whole line's length."""

    size: int


class _Tally:
    """Accumulates records, bytes and problems, keeping only what a Report holds."""

    def __init__(self, max_problems: int) -> None:
        if max_problems < 0:
            raise ValueError(f"max_problems must be 0 or more, got {max_problems}")
        self.max_problems = max_problems
        self.bytes = 0
        # 4 bytes a record rather than ~36 for a list of ints: millions of records stay cheap.
        self.prompt_chars = array("I")
        self.response_chars = array("I")
        self.problems: list[Problem] = []
        self.problem_count = 0

    def counted(self, lines: Iterable[bytes]) -> Iterator[bytes]:
        """Passes ``lines`` through, adding up their size."""
        for line in lines:
            self.bytes += _byte_size(line)
            yield line

    def add(self, item: Record | Problem) -> None:
        """Counts one scan result."""
        if isinstance(item, Record):
            self.prompt_chars.append(len(item.prompt))
            self.response_chars.append(len(item.response))
            return
        self.problem_count += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(item)

    def report(self, sources: Iterable[str]) -> Report:
        """Freezes the totals into a Report."""
        return Report(sources=tuple(sources), records=len(self.prompt_chars), bytes=self.bytes,
                      prompt_chars=_length_stats(self.prompt_chars),
                      response_chars=_length_stats(self.response_chars),
                      problems=tuple(self.problems), problem_count=self.problem_count)


def _scan_file(path: str | os.PathLike, source: str,
               wrap=lambda lines: lines) -> Iterator[Record | Problem]:
    """scan_lines over a file, turning a path that cannot be read into a Problem."""
    if os.path.isdir(path):
        yield Problem(source, None, None, "is a directory; give the path of a JSON Lines file")
        return
    try:
        with open(path, "rb") as f:
            yield from scan_lines(wrap(_file_lines(f)), source)
    except FileNotFoundError:
        yield Problem(source, None, None, "does not exist; check the path")
    except OSError as exc:
        yield Problem(source, None, None, f"cannot be read ({exc.strerror or exc}); "
                                          "check the file's permissions and that it is a file")


def _file_lines(f: BinaryIO) -> Iterator[bytes]:
    """Yields a binary file's lines, holding at most MAX_LINE_BYTES of any one in memory."""
    return split_chunks(iter(lambda: f.read(_READ_BYTES), b""))


def split_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Splits a byte stream (a file read in blocks, an S3 body) into lines at ``\\n`` only, endings
    kept, as a file opened ``'rb'`` does.

    Not botocore's ``iter_lines``: it also splits at a lone ``\\r`` (JSON whitespace, so line numbers
    would differ) and holds a line of any length in memory. A line over MAX_LINE_BYTES comes out
    as its start, carrying its full size, so that ``scan_lines`` reports it without holding it all.
    """
    limit = MAX_LINE_BYTES
    head, size = bytearray(), 0  # the unfinished line: its first limit + 1 bytes, its full length
    for chunk in chunks:
        start, whole = 0, True
        while start < len(chunk):
            end = chunk.find(b"\n", start)
            stop = len(chunk) if end < 0 else end + 1
            if end >= 0 and not size and stop - start <= limit:
                if whole:  # once a chunk: all its lines up to its last \n in one C call
                    whole, last = False, chunk.rfind(b"\n") + 1
                    block = chunk[start:last]
                    # splitlines also splits at a lone \r: only when there is none is it exact.
                    if len(block) <= limit and block.count(b"\r") == block.count(b"\r\n"):
                        yield from block.splitlines(keepends=True)
                        start = last
                        continue
                yield chunk[start:stop]  # the common case: a whole line inside one chunk
            else:
                head += chunk[start:min(stop, start + max(0, limit + 1 - len(head)))]
                size += stop - start
                if end >= 0:
                    yield _finished(head, size, limit)
                    head, size = bytearray(), 0
            start = stop
    if size:
        yield _finished(head, size, limit)


def _finished(head: bytearray, size: int, limit: int) -> bytes:
    if size <= limit:
        return bytes(head)
    line = _LongLine(head)  # scan_lines takes the line's size from it
    line.size = size
    return line


def _byte_size(line: bytes) -> int:
    return line.size if isinstance(line, _LongLine) else len(line)


def _check_line(raw: bytes, size: int, lineno: int, source: str) -> dict | Problem:
    """Returns one non-blank line's object when it is a valid record, else its first Problem."""
    if size > MAX_LINE_BYTES:
        return Problem(source, lineno, None,
                       f"is {size:,} bytes, over the {MAX_LINE_BYTES:,}-byte limit for one record; "
                       "end each record with a newline (a minified JSON file is one long line)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Problem(source, lineno, None, f"is not valid UTF-8 (byte 0x{raw[exc.start]:02x} "
                                             f"at byte {exc.start + 1}); save the file as UTF-8")
    try:
        obj = _parse(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, too many digits, deep nesting
        return Problem(source, lineno, None, _json_error(text.rstrip("\r\n"), exc))
    if obj.__class__ is not dict:
        return Problem(source, lineno, None, f"is {_KINDS[type(obj)]}, not a JSON object; "
                                             f"write each record as {_ONE_RECORD}")
    for field in FIELDS:
        value = obj.get(field)
        # The common case in one test: a non-blank ASCII string (isascii() is O(1) for str, and
        # an ASCII string has no surrogates).
        if value.__class__ is not str or not value.isascii() or not value or value.isspace():
            message = _field_problem(obj, field)
            if message:
                return Problem(source, lineno, field, message)
    return obj


def _parse(text: str) -> object:
    """``json.loads(text)``, about a third faster for the usual line: one value, then its ending.

    json.loads wraps the C scanner in Python that skips whitespace with regular expressions on both
    sides of the value; a line starting with its value and ending right after it needs none of it.
    Anything else goes through json.loads itself, which raises its own error for a bad line.
    """
    try:
        obj, end = _SCAN_ONCE(text, 0)
    except (StopIteration, ValueError, RecursionError):  # StopIteration: no value at 0
        return json.loads(text)
    if end == len(text) or text[end:] in _LINE_ENDS:
        return obj
    return json.loads(text)  # trailing whitespace (the same value) or extra data (its error)


def _json_error(visible: str, exc: Exception) -> str:
    """Says why a line is not JSON, from the error on its ``visible`` part (the line without its
    ending), so that the position is one the user sees; ``exc`` is the error on the whole line."""
    try:
        json.loads(visible)
    except (ValueError, RecursionError) as visible_exc:
        exc = visible_exc
    if isinstance(exc, json.JSONDecodeError):
        detail = f"{exc.msg} at character {exc.pos + 1}"
    else:
        detail = str(exc)
    return (f"is not valid JSON ({detail}); write one complete JSON object per line "
            "(a pretty-printed object spans several lines)")


def _field_problem(obj: dict, field: str) -> str | None:
    """Says what is wrong with ``obj[field]``, or None when it is a usable string."""
    if field not in obj:
        return f"is missing; give every record a {field!r} string{_keys_hint(obj)}"
    value = obj[field]
    if not isinstance(value, str):
        return (f"is {_KINDS[type(value)]}, not a string; "
                f"give every record a {field} as text in quotes")
    if not value or value.isspace():  # strip()'s whitespace, without the copy
        return f"is empty or whitespace only; give every record a non-empty {field}"
    if _SURROGATE.search(value):
        return ("contains an unpaired surrogate escape (\\ud800-\\udfff); escape characters "
                "outside the BMP as a surrogate pair or write them as UTF-8")
    return None


def _keys_hint(obj: dict) -> str:
    # A missing field is usually another schema (instruction/output, messages): show what is there.
    if not obj:
        return " (the object is empty)"
    keys = ", ".join(repr(key[:40]) for key in list(obj)[:5])
    return f" (keys found: {keys}{', ...' if len(obj) > 5 else ''})"


def _length_stats(lengths: array) -> LengthStats | None:
    """Summarises lengths, counting distinct values rather than sorting a copy of them all."""
    if not lengths:
        return None
    n = len(lengths)
    counts = sorted(Counter(lengths).items())
    return LengthStats(count=n, min=counts[0][0], max=counts[-1][0], mean=sum(lengths) / n,
                       p50=_nearest_rank(counts, n, 50), p95=_nearest_rank(counts, n, 95))


def _nearest_rank(counts: list[tuple[int, int]], n: int, percent: int) -> int:
    rank = max(1, -(-percent * n // 100))  # ceil without floats
    seen = 0
    for value, count in counts:
        seen += count
        if seen >= rank:
            return value
    return counts[-1][0]


def _format_stats(stats: LengthStats) -> str:
    return (f"min {stats.min:,}  mean {stats.mean:,.1f}  p50 {stats.p50:,}  "
            f"p95 {stats.p95:,}  max {stats.max:,}")


def _list_problems(problems: Sequence[Problem], total: int, limit: int | None = None) -> str:
    shown = list(problems[:limit])
    lines = [str(problem) for problem in shown]
    if total > len(shown):
        lines.append(f"... and {_plural(total - len(shown), 'more problem')}")
    return "\n".join(lines)


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
