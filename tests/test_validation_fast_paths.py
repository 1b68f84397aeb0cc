"""The validator's fast paths (issue 11, item 8: staging throughput) change no result: split_chunks
splits as a file opened 'rb' does, and scan_lines gives the Records and Problems, messages included,
of the plain definition it had before them, on tens of thousands of generated lines."""

from __future__ import annotations

import io
import json
import random
import re

import pytest

from ftstack_train import validation
from ftstack_train.validation import Problem, Record, scan_lines, split_chunks


def reference(raw: bytes, lineno: int, source: str) -> Record | Problem:
    """One non-blank line as the validator judged it before its fast paths: json.loads of the
    line without its ending, and each field tested with strip() and the surrogate regex."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Problem(source, lineno, None, f"is not valid UTF-8 (byte 0x{raw[exc.start]:02x} "
                                             f"at byte {exc.start + 1}); save the file as UTF-8")
    try:
        obj = json.loads(text.rstrip("\r\n"))
    except (ValueError, RecursionError) as exc:
        detail = f"{exc.msg} at character {exc.pos + 1}" if isinstance(exc, json.JSONDecodeError) else str(exc)
        return Problem(source, lineno, None, f"is not valid JSON ({detail}); write one complete JSON object per line "
                                             "(a pretty-printed object spans several lines)")
    if not isinstance(obj, dict):
        return Problem(source, lineno, None, f"is {validation._KINDS[type(obj)]}, not a JSON object; "
                                             f"write each record as {validation._ONE_RECORD}")
    for field in validation.FIELDS:
        value = obj.get(field)
        if field not in obj:
            return Problem(source, lineno, field, f"is missing; give every record a {field!r} string"
                                                  f"{validation._keys_hint(obj)}")
        if not isinstance(value, str):
            return Problem(source, lineno, field, f"is {validation._KINDS[type(value)]}, not a string; "
                                                  f"give every record a {field} as text in quotes")
        if not value.strip():
            return Problem(source, lineno, field, f"is empty or whitespace only; give every record a non-empty {field}")
        if re.search("[\ud800-\udfff]", value):
            return Problem(source, lineno, field, "contains an unpaired surrogate escape (\\ud800-\\udfff); escape "
                                                  "characters outside the BMP as a surrogate pair or write them as UTF-8")
    return Record(obj["prompt"], obj["response"], lineno)


VALUES = ['"p"', '"a longer prompt"', '""', '"  "', '"\\t\\n"', '"\\u3000"', '"caf\u00e9"', '"\\ud83d"', '"\\ud83d\\ude00"',
          '"\U0001f600"', "null", "1", "1.5", "true", '["a"]', '{"x": "y"}', '"\\u00e9"', '"a\\"b"', '"\\u2028"', '"x\u2003"']
ENDS = ["\n", "\r\n", "", " \n", "\t\r\n", "\r", "  "]


def generated_line(rng: random.Random) -> bytes:
    """A line most often valid, else wrong in one of the ways files are."""
    fields = {"prompt": rng.choice(VALUES), "response": rng.choice(VALUES)}
    if rng.random() < 0.1:
        del fields[rng.choice(list(fields))]
    if rng.random() < 0.1:
        fields["extra"] = rng.choice(VALUES)
    body = "{" + ", ".join(f'"{k}": {v}' for k, v in rng.sample(list(fields.items()), len(fields))) + "}"
    body = rng.choice([body, body, body, " " + body, body + " x", body[:-1], "[" + body + "]", "7", '"s"',
                       body.replace(": ", ":"), "\ufeff" + body, body + body])
    raw = (body + rng.choice(ENDS)).encode("utf-8", "surrogatepass")
    if rng.random() < 0.03:
        raw = raw.replace(b"p", b"\xe9", 1)  # Latin-1, not UTF-8
    return raw


@pytest.mark.parametrize("seed", range(4))
def test_scan_lines_judges_every_line_as_the_plain_definition_does(seed):
    rng = random.Random(seed)
    lines = [generated_line(rng) for _ in range(5000)]
    lines = [b"\n" if line.strip() == b"" else line for line in lines]
    # A first line that is neither an array nor UTF-16, so that every line is checked on its own.
    data = [b'{"prompt": "p", "response": "r"}\n', *lines]
    expected = [reference(raw, n, "f") for n, raw in enumerate(data, 1) if raw.strip()]
    assert list(scan_lines(data, "f")) == expected
    copied = list(scan_lines(data, "f", copy=True))
    assert [item for item in copied if isinstance(item, Problem)] == [e for e in expected if isinstance(e, Problem)]
    assert [item for item in copied if not isinstance(item, Problem)] == \
        [raw for n, raw in enumerate(data, 1) if raw.strip() and isinstance(reference(raw, n, "f"), Record)]


@pytest.mark.parametrize("seed", range(6))
def test_split_chunks_splits_as_a_binary_file_for_any_chunking(seed):
    rng = random.Random(seed)
    alphabet = [b"\n", b"\r", b"\r\n", b"{", b'"', b"a", b" ", b"\xe9", b"\n\n"]
    data = b"".join(rng.choice(alphabet) * rng.randint(1, 5) for _ in range(4000))
    if seed % 2:  # Windows line endings only, which the whole-chunk path takes
        data = data.replace(b"\r", b"").replace(b"\n", b"\r\n")
    cuts = sorted(rng.sample(range(1, len(data)), 40))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    assert list(split_chunks(chunks)) == io.BytesIO(data).readlines()
