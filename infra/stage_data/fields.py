"""The SageMaker request fields that carry values from an execution's input, with AWS's own limits
on each (botocore's service model: length and pattern), so that staging rejects a value that would
fail CreateTrainingJob or CreateModelPackage hours later.

AWS's patterns are Java regular expressions with Unicode classes (``\\p{L}``) that ``re`` cannot
read, and the Lambda has no ``regex`` module: each field's pattern is written here as a test of
one character on Unicode categories. tests/infra/test_sagemaker_fields.py ties every field to its
botocore shape (limits and pattern text) and checks, character by character over all of Unicode,
that the test here accepts exactly what the pattern accepts. Lengths are counted as Java counts
them, in UTF-16 code units.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

LINE_TERMINATORS = frozenset("\n\r\u0085\u2028\u2029")
"""What ``.`` does not match in a Java pattern (nor in an ECMAScript one)."""


def _letters_digits_spaces(extra: str) -> Callable[[str], bool]:
    """``[\\p{L}\\p{Z}\\p{N}<extra>]``"""
    return lambda char: unicodedata.category(char)[0] in "LZN" or char in extra


def _printable(char: str) -> bool:
    """``[\\p{L}\\p{M}\\p{Z}\\p{S}\\p{N}\\p{P}]``: every category but the C* ones (control, format,
    unassigned, private use, surrogate)."""
    return unicodedata.category(char)[0] != "C"


def _not_line_terminator(char: str) -> bool:
    return char not in LINE_TERMINATORS


@dataclass(frozen=True)
class Field:
    """One request member: where it goes, its botocore shape and that shape's limits."""

    where: str
    """``Operation: Member``, as the message shows it."""
    shape: str
    """The botocore shape name (the tests read its limits and pattern from botocore)."""
    min: int
    max: int
    pattern: str
    """botocore's pattern, verbatim."""
    allows: Callable[[str], bool]
    """Whether one character matches the pattern's character class."""
    allowed: str
    """The class in words, for the message."""

    def problem(self, value: str) -> str | None:
        """What is wrong with ``value`` in this field, or None."""
        units = len(value.encode("utf-16-le")) // 2
        if units < self.min:
            return f"is empty, and {self.where} takes at least {self.min} character"
        if units > self.max:
            return f"is {units} characters long, over the {self.max} that {self.where} takes"
        for position, char in enumerate(value, 1):
            if not self.allows(char):
                return (f"has {_describe(char)} at position {position}, which {self.where} does not allow "
                        f"(it takes {self.allowed})")
        return None


def _describe(char: str) -> str:
    name = unicodedata.name(char, "")
    return f"{char!r} (U+{ord(char):04X}{' ' + name if name else ''})"


_TAG_CLASS = "letters, digits, spaces and _ . : / = + - @"

TAG_VALUE = Field("CreateTrainingJob: Tags.Value", "TagValue", 0, 256,
                  r"([\p{L}\p{Z}\p{N}_.:/=+\-@]*)", _letters_digits_spaces("_.:/=+-@"), _TAG_CLASS)
METADATA_VALUE = Field("CreateModelPackage: CustomerMetadataProperties", "CustomerMetadataValue", 1, 256,
                       r"([\p{L}\p{Z}\p{N}_.:\/=+\-@]*)${1,256}", _letters_digits_spaces("_.:/=+-@"), _TAG_CLASS)
DESCRIPTION = Field("CreateModelPackage: ModelPackageDescription", "EntityDescription", 0, 1024,
                    r"[\p{L}\p{M}\p{Z}\p{S}\p{N}\p{P}]*", _printable,
                    "letters, marks, spaces, symbols, digits and punctuation, no control characters")
S3_URI = Field("CreateTrainingJob: S3Uri", "S3Uri", 0, 1024, "(https|s3)://([^/]+)/?(.*)", _not_line_terminator,
               "no line breaks")
HYPERPARAMETER_KEY = Field("CreateTrainingJob: HyperParameters (name)", "HyperParameterKey", 0, 256, ".*",
                           _not_line_terminator, "no line breaks")
HYPERPARAMETER_VALUE = Field("CreateTrainingJob: HyperParameters (value)", "HyperParameterValue", 0, 2500, ".*",
                             _not_line_terminator, "no line breaks")

FIELDS = (TAG_VALUE, METADATA_VALUE, DESCRIPTION, S3_URI, HYPERPARAMETER_KEY, HYPERPARAMETER_VALUE)

MODEL_PACKAGE_DESCRIPTION = "Fine-tuned from {} by execution {}"
"""The registered package's description; the workflow fills it in with States.Format, which takes
the same ``{}`` placeholders."""
