"""Tests for ftstack_train.validation: every bad-input class, the good edge cases, and streaming."""

import io
import itertools
import json
import pickle

import pytest

from ftstack_train import validation
from ftstack_train.validation import (
    DataError, LengthStats, Problem, Record, read_records, scan_lines, split_chunks, validate_files,
    validate_stream,
)

GOOD = b'{"prompt": "p", "response": "r"}\n'


def scan(data: bytes, source: str = "data.jsonl") -> list:
    """Scans ``data`` split the way a file opened 'rb' splits it."""
    return list(scan_lines(data.splitlines(keepends=True), source))


def problems_of(items: list) -> list[Problem]:
    return [item for item in items if isinstance(item, Problem)]


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- bad records: the line and field are exact, and the message says how to fix it -------------

@pytest.mark.parametrize("field", ["prompt", "response"])
@pytest.mark.parametrize("value, says", [
    (None, "is missing"),
    ("null", "is null, not a string"),
    ("42", "is a number, not a string"),
    ("1.5", "is a number, not a string"),
    ('["a"]', "is an array, not a string"),
    ('{"text": "a"}', "is an object, not a string"),
    ("true", "is a boolean, not a string"),
    ('""', "is empty or whitespace only"),
    ('" \\t\\n "', "is empty or whitespace only"),
    ('"\\u3000"', "is empty or whitespace only"),
])
def test_bad_field_names_line_field_and_fix(field, value, says):
    record = {"prompt": '"p"', "response": '"r"'}
    if value is None:
        del record[field]
    else:
        record[field] = value
    line = "{" + ", ".join(f'"{k}": {v}' for k, v in record.items()) + "}"
    # A blank line before the bad one: line numbers count physical lines, blank ones included.
    items = scan(GOOD + b"\n" + line.encode() + b"\n" + GOOD)

    [problem] = problems_of(items)
    assert (problem.source, problem.line, problem.field) == ("data.jsonl", 3, field)
    assert says in problem.message
    assert "give every record" in problem.message
    assert [item.line for item in items if isinstance(item, Record)] == [1, 4]


def test_missing_field_shows_the_keys_that_are_there():
    [problem] = scan(b'{"instruction": "i", "output": "o"}\n')
    assert problem.field == "prompt"
    assert "keys found: 'instruction', 'output'" in problem.message


def test_a_line_with_two_bad_fields_is_one_problem_on_the_first():
    [problem] = scan(b"{}\n")
    assert (problem.line, problem.field) == (1, "prompt")
    assert "the object is empty" in problem.message


def test_lone_surrogate_escape_is_a_problem_but_a_surrogate_pair_is_text():
    items = scan(b'{"prompt": "\\ud83d\\ude00", "response": "r"}\n'
                 b'{"prompt": "\\ud83d", "response": "r"}\n')
    assert items[0] == Record("\U0001F600", "r", 1)
    assert (items[1].line, items[1].field) == (2, "prompt")
    assert "surrogate" in items[1].message


# --- bad lines --------------------------------------------------------------------------------

@pytest.mark.parametrize("line, says, hint", [
    (b'{"prompt": "p", "response": "r"', "(Expecting ',' delimiter at character 32)",
     "one complete JSON object per line"),
    (b'{"prompt": "p",', "is not valid JSON", "pretty-printed object spans several lines"),
    (b"{'prompt': 'p', 'response': 'r'}", "is not valid JSON", "one complete JSON object"),
    (b'{"prompt": "p", "response": "r"} {"prompt": "p"}', "Extra data", "one complete JSON"),
    (b"[" * 100_000, "is not valid JSON", "one complete JSON object per line"),
    (b"42", "is a number, not a JSON object", '{"prompt": "...", "response": "..."}'),
    (b'"just text"', "is a string, not a JSON object", "write each record as"),
    (b"null", "is null, not a JSON object", "write each record as"),
    (b'[{"prompt": "p", "response": "r"}]', "is an array, not a JSON object", "write each"),
    (b'{"prompt": "caf\xe9", "response": "r"}', "is not valid UTF-8 (byte 0xe9 at byte 16)",
     "save the file as UTF-8"),
    (b"\xff\xfe", "is not valid UTF-8", "save the file as UTF-8"),
])
def test_bad_line_names_the_line_and_fix(line, says, hint):
    items = scan(GOOD + line + b"\r\n" + GOOD)
    [problem] = problems_of(items)
    assert (problem.line, problem.field) == (2, None)
    assert says in problem.message
    assert hint in problem.message
    assert len(items) == 3


def test_pretty_printed_object_is_a_problem_on_every_line_it_spans():
    items = scan(GOOD + b'{\n  "prompt": "p",\n  "response": "r"\n}\n')
    assert [p.line for p in problems_of(items)] == [2, 3, 4, 5]


# --- whole-file problems: reported once ------------------------------------------------------

ARRAY_ON_ONE_LINE = b'[{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]\n'
PRETTY_ARRAY = b'[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "c", "response": "d"}\n]\n'


@pytest.mark.parametrize("data, line", [
    (ARRAY_ON_ONE_LINE, 1),
    (PRETTY_ARRAY, 1),
    (b"\n  \n" + PRETTY_ARRAY, 3),
    (b"\xef\xbb\xbf" + PRETTY_ARRAY, 1),
    (b'[{"prompt": "a",\n "response": "b"}]', 1),
    (b"[1, 2, 3]", 1),
])
def test_json_array_is_one_problem(data, line):
    assert scan(data) == [Problem("data.jsonl", line, None, validation._ARRAY_FIX)]
    assert "the file is a JSON array; write one object per line (JSON Lines)" in str(scan(data)[0])


def test_utf16_file_is_one_problem():
    data = '{"prompt": "p", "response": "r"}\r\n'.encode("utf-16") * 3
    [problem] = scan(data)
    assert problem.line == 1
    assert "UTF-16" in problem.message and "save it as UTF-8" in problem.message


@pytest.mark.parametrize("data", [b"", b"\n", b"\n \t\r\n\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\r\n"])
def test_file_without_records_is_a_file_level_problem(data):
    [problem] = scan(data)
    assert (problem.line, problem.field) == (None, None)
    assert "has no records" in problem.message
    assert str(problem).startswith("data.jsonl: has no records")


def test_file_of_bad_lines_gets_no_extra_no_records_problem():
    assert [p.line for p in scan(b"1\n2\n")] == [1, 2]


def test_too_long_line_is_read_in_bounded_pieces_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(validation, "MAX_LINE_BYTES", 64)
    long_line = b'{"prompt": "' + b"x" * 200 + b'", "response": "r"}\n'
    path = write(tmp_path, "long.jsonl", GOOD + long_line + GOOD)

    report = validate_files([path])

    [problem] = report.problems
    assert problem.line == 2 and f"is {len(long_line)} bytes" in problem.message
    assert report.records == 2
    assert report.bytes == path.stat().st_size


def test_minified_array_too_long_to_load_is_still_reported_as_an_array(tmp_path, monkeypatch):
    monkeypatch.setattr(validation, "MAX_LINE_BYTES", 64)
    path = write(tmp_path, "data.json", ARRAY_ON_ONE_LINE * 10)

    report = validate_files([path])

    assert [p.message for p in report.problems] == [validation._ARRAY_FIX]


# --- good edge cases --------------------------------------------------------------------------

def test_bom_crlf_blank_lines_and_extra_keys_are_accepted():
    data = (b'\xef\xbb\xbf{"prompt": "a", "response": "b", "id": 7, "meta": {"x": [1]}}\r\n'
            b"\r\n   \r\n"
            b'{"response": "d", "prompt": "c"}\r\n'
            b"\n\n")
    assert scan(data) == [Record("a", "b", 1), Record("c", "d", 4)]


def test_unicode_is_counted_in_characters_not_bytes():
    record = {"prompt": "你好🙂", "response": "ok"}
    data = json.dumps(record, ensure_ascii=False).encode()  # no trailing newline
    report = validate_stream([data], "s3://bucket/train.jsonl")
    assert report.ok and report.records == 1
    assert report.prompt_chars.max == 3
    assert report.bytes == len(data) and len(data) > len(json.dumps(record, ensure_ascii=False))


def test_last_line_without_newline_is_a_record():
    assert scan(GOOD + b'{"prompt": "x", "response": "y"}') == [
        Record("p", "r", 1), Record("x", "y", 2)]


def test_lines_given_without_endings_as_botocore_iter_lines_gives_them():
    lines = [b'\xef\xbb\xbf{"prompt": "a", "response": "b"}', b"",
             b'{"prompt": "c", "response": "d"}']
    report = validate_stream(lines, "s3://bucket/train.jsonl")
    assert report.ok and report.records == 2
    assert report.bytes == sum(map(len, lines))
    assert list(scan_lines(lines, "s")) == [Record("a", "b", 1), Record("c", "d", 3)]


def test_every_non_blank_line_is_a_record_or_a_problem():
    data = GOOD + b"\n" + b"42\n" + b'{"prompt": ""}\n' + b"{bad\n" + GOOD + b"\xff\n\n"
    items = scan(data)
    non_blank = [n for n, line in enumerate(data.splitlines(), 1) if line.strip()]
    assert sorted(item.line for item in items) == non_blank


def test_text_lines_are_refused_with_the_fix():
    with pytest.raises(TypeError, match="'rb' mode"):
        list(scan_lines(['{"prompt": "p", "response": "r"}\n'], "s"))


# --- streaming -----------------------------------------------------------------------------

def test_scan_lines_yields_each_record_before_reading_the_next_line():
    read = []

    def lines():
        for n in range(3):
            read.append(n)
            yield GOOD

    items = scan_lines(lines(), "s")
    assert next(items) == Record("p", "r", 1)
    assert read == [0]


def test_scan_lines_works_on_an_endless_stream():
    items = scan_lines(itertools.repeat(GOOD), "s")
    assert [item.line for item in itertools.islice(items, 5)] == [1, 2, 3, 4, 5]


def test_read_records_streams_a_file(tmp_path):
    path = write(tmp_path, "train.jsonl", GOOD * 2 + b'{"prompt": "x", "response": "y"}\n')
    assert list(read_records(path)) == [
        Record("p", "r", 1), Record("p", "r", 2), Record("x", "y", 3)]


def test_read_records_raises_on_the_first_bad_line(tmp_path):
    path = write(tmp_path, "train.jsonl", GOOD + b"\n" + b'{"prompt": null}\n' + b"not json\n")
    records = read_records(str(path))
    assert next(records) == Record("p", "r", 1)
    with pytest.raises(DataError) as caught:
        next(records)
    [problem] = caught.value.problems
    assert (problem.source, problem.line, problem.field) == (str(path), 3, "prompt")
    assert str(caught.value) == f"{path}:3: field 'prompt': " + problem.message


def test_read_records_raises_data_error_for_a_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist; check the path"):
        list(read_records(tmp_path / "nope.jsonl"))


# --- Problem and DataError -------------------------------------------------------------------

def test_problem_str_names_source_line_and_field():
    problem = Problem("data/train.jsonl", 12, "prompt",
                      "is empty or whitespace only; give every record a non-empty prompt")
    assert str(problem) == ("data/train.jsonl:12: field 'prompt': is empty or whitespace only; "
                            "give every record a non-empty prompt")
    assert str(Problem("data/train.jsonl", None, None, "has no records")) == (
        "data/train.jsonl: has no records")
    assert str(Problem("a.jsonl", 3, None, "is not valid JSON")) == "a.jsonl:3: is not valid JSON"


def many_problems(n: int) -> list[Problem]:
    return [Problem("a.jsonl", line, None, "bad") for line in range(1, n + 1)]


def test_data_error_lists_every_problem_when_few():
    error = DataError(many_problems(3))
    assert str(error) == "a.jsonl:1: bad\na.jsonl:2: bad\na.jsonl:3: bad"
    assert error.total == 3 and isinstance(error, ValueError)


@pytest.mark.parametrize("kept, total, more", [(25, None, 5), (20, 100, 80), (21, 21, 1)])
def test_data_error_lists_twenty_then_how_many_more(kept, total, more):
    error = DataError(many_problems(kept), total)
    lines = str(error).splitlines()
    assert lines[:20] == [f"a.jsonl:{n}: bad" for n in range(1, 21)]
    assert lines[20:] == [f"... and {more} more problem{'s' if more > 1 else ''}"]
    assert error.total == (total or kept)


def test_data_error_survives_pickling():
    error = pickle.loads(pickle.dumps(DataError(many_problems(2), 7)))
    assert error.problems == many_problems(2) and error.total == 7


# --- reports ---------------------------------------------------------------------------------

def test_length_stats_use_nearest_rank_percentiles():
    lines = [json.dumps({"prompt": "x" * n, "response": "y"}).encode() for n in range(100, 0, -1)]
    report = validate_stream(lines, "s")
    assert report.prompt_chars == LengthStats(count=100, min=1, max=100, mean=50.5, p50=50, p95=95)
    assert report.response_chars == LengthStats(count=100, min=1, max=1, mean=1.0, p50=1, p95=1)


def test_format_of_a_good_report_has_counts_and_stats():
    report = validate_stream([GOOD, b'{"prompt": "ppp", "response": "rr"}\n'], "train.jsonl")
    text = report.format()
    assert report.ok and text.splitlines()[0] == "train.jsonl: OK"
    assert "records: 2" in text and f"bytes:   {report.bytes}" in text
    assert "prompt chars:   min 1  mean 2.0  p50 1  p95 3  max 3" in text
    assert "response chars: min 1  mean 1.5  p50 1  p95 2  max 2" in text


def test_format_of_a_bad_report_lists_problems_and_how_many_more():
    report = validate_stream([b"1\n"] * 5 + [GOOD], "train.jsonl", max_problems=2)
    text = report.format()
    assert not report.ok and text.splitlines()[0] == "train.jsonl: 5 problems"
    assert "records: 1" in text
    assert "train.jsonl:1: is a number" in text and "train.jsonl:2: is a number" in text
    assert "train.jsonl:3:" not in text
    assert text.endswith("... and 3 more problems")


def test_report_without_records_has_no_stats():
    report = validate_stream([], "empty.jsonl")
    assert (report.records, report.bytes, report.prompt_chars, report.response_chars) == (
        0, 0, None, None)
    assert report.problem_count == 1 and "has no records" in report.format()


def test_validate_files_combines_two_files(tmp_path):
    first = write(tmp_path, "a.jsonl", GOOD + b"oops\n" + GOOD)
    second = write(tmp_path, "b.jsonl", b"\n" + GOOD + b'{"prompt": "p", "response": 1}\n')

    report = validate_files([first, str(second)])

    assert report.sources == (str(first), str(second))
    assert report.records == 3 and report.problem_count == 2
    assert report.bytes == first.stat().st_size + second.stat().st_size
    assert [(p.source, p.line, p.field) for p in report.problems] == [
        (str(first), 2, None), (str(second), 3, "response")]
    assert report.prompt_chars.count == 3


def test_validate_files_reports_missing_path_and_directory_and_goes_on(tmp_path):
    good = write(tmp_path, "good.jsonl", GOOD)
    missing = tmp_path / "missing.jsonl"

    report = validate_files([missing, tmp_path, good])

    assert report.records == 1
    assert [(p.source, p.line) for p in report.problems] == [
        (str(missing), None), (str(tmp_path), None)]
    assert "does not exist; check the path" in report.problems[0].message
    assert "is a directory; give the path of a JSON Lines file" in report.problems[1].message


def test_validate_files_keeps_max_problems_but_counts_them_all(tmp_path):
    first = write(tmp_path, "a.jsonl", b"x\n" * 30)
    second = write(tmp_path, "b.jsonl", b"y\n" * 30 + GOOD)

    report = validate_files([first, second], max_problems=5)

    assert len(report.problems) == 5 and report.problem_count == 60
    assert report.records == 1
    assert report.format().endswith("... and 55 more problems")
    assert report.format().startswith(f"{first}, {second}: 60 problems")


def test_validate_files_refuses_bad_arguments():
    with pytest.raises(ValueError, match="at least one path"):
        validate_files([])
    with pytest.raises(ValueError, match="max_problems"):
        validate_stream([GOOD], "s", max_problems=-1)


def test_validate_files_zero_max_problems_still_counts(tmp_path):
    report = validate_files([write(tmp_path, "a.jsonl", b"x\n" * 3)], max_problems=0)
    assert report.problems == () and report.problem_count == 3 and not report.ok


@pytest.mark.parametrize("data", [
    b"", b"a", b"\n", b"ab\ncd", b"ab\ncd\n", b"a\r\nb\rc\n\n\nd", b"\n\nxyz\n" * 5, bytes(range(256)) * 3,
])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_split_chunks_matches_a_binary_file(data, chunk):
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    assert list(split_chunks(chunks)) == io.BytesIO(data).readlines()


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_split_chunks_keeps_only_the_start_of_an_over_long_line(monkeypatch, chunk):
    monkeypatch.setattr(validation, "MAX_LINE_BYTES", 10)
    data = b"short\n" + b"x" * 50 + b"\n" + b"y" * 11 + b"\nlast"
    lines = list(split_chunks(data[i:i + chunk] for i in range(0, len(data), chunk)))
    assert lines == [b"short\n", b"x" * 11, b"y" * 11, b"last"]
    assert [getattr(line, "size", len(line)) for line in lines] == [6, 51, 12, 4]
