"""Pull the final number out of a model's answer and compare it with the reference.

Models phrase answers loosely ("The final answer is: **$1,234.50**", "\\boxed{18}",
"#### 18", "... so she makes 18 dollars."). The extractor tries, in order: the last
"final answer" phrase, the last ``\\boxed{}``, the last ``####``, the last "answer is",
and finally the last number anywhere. AIME answers are integers 0-999: :func:`grade` with
``integer=True`` accepts only an integral prediction equal to the reference.
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?")
_FINAL = re.compile(r"final\s+answer\s*(?:is|:|=)?\s*:?", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_HASHES = re.compile(r"####")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?", re.IGNORECASE)


def parse_number(text: str) -> float | None:
    """The value of the first number in ``text`` (commas, ``$`` and fractions allowed)."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    token = match.group(0).replace(",", "").replace(" ", "")
    if "/" in token:
        num, den = token.split("/")
        return float(num) / float(den) if float(den) != 0 else None
    return float(token)


def format_number(value: float) -> str:
    """Canonical text of a number: integers without a decimal point, others rounded to 1e-6."""
    if math.isfinite(value) and value == round(value):
        return str(int(round(value)))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _number_after(text: str) -> str | None:
    """The number that a marker introduces: rest of its line, after the last ``=`` if any."""
    line = text.split("\n", 1)[0]
    if "=" in line:
        line = line.rsplit("=", 1)[1]
    value = parse_number(line.replace("**", ""))
    return None if value is None else format_number(value)


def extract_answer(text: str) -> str | None:
    """The model's final numeric answer as canonical text, or None if it gave no number."""
    for pattern in (_FINAL, _BOXED, _HASHES, _ANSWER_IS):
        matches = list(pattern.finditer(text))
        for match in reversed(matches):
            span = match.group(1) if pattern is _BOXED else text[match.end() :]
            found = _number_after(span)
            if found is not None:
                return found
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    value = parse_number(numbers[-1])
    return None if value is None else format_number(value)


def is_correct(predicted: str | None, reference: str, rel_tol: float = 1e-6) -> bool:
    """Numeric equality of the extracted answer and the reference (relative tolerance)."""
    if predicted is None:
        return False
    pred, ref = parse_number(predicted), parse_number(reference)
    if pred is None or ref is None:
        return False
    return math.isclose(pred, ref, rel_tol=rel_tol, abs_tol=rel_tol)


def is_integer_match(predicted: str | None, reference: str) -> bool:
    """Exact integer equality (AIME): ``12.5`` never matches ``12``, ``012`` matches ``12``."""
    if predicted is None:
        return False
    pred, ref = parse_number(predicted), parse_number(reference)
    if pred is None or ref is None or pred != round(pred) or ref != round(ref):
        return False
    return int(round(pred)) == int(round(ref))


def grade(text: str, reference: str, integer: bool = False) -> tuple[str | None, bool]:
    """The answer extracted from a model's ``text`` and whether it matches ``reference``
    (numerically, or as an integer when ``integer``)."""
    predicted = extract_answer(text)
    match = is_integer_match if integer else is_correct
    return predicted, match(predicted, reference)
