"""Multiple-choice answers: which option a completion commits to, as a letter (pure).

A multiple-choice problem has options A, B, C, ... (`choices`: their texts). Votes, rewards and
gold comparisons are over letters, and two letters are equivalent only when identical
(`grading.is_equivalent` compares capital letters exactly, never by sympy). A letter and its
option's text name the same answer: `choice_of` maps either to the letter.

`extract_choice` takes the *final committed* answer, trying in order, first found wins:
1. the last `\\boxed{}`: "\\boxed{C}", "\\boxed{\\textbf{(C)}}", "\\boxed{(C) 42}", "\\boxed{42}";
   a boxed answer that names no option is no answer;
2. the last answer phrase that is not negated and names an option: "the answer is (C)",
   "Answer: C", "the correct option is **C**", "I choose C", "#### C", "The answer is 42.";
3. the last letter mention that is not negated ("not (A)", "(A) is wrong", "rule out A") and
   not a line of a restated option list: "(C)", "C)", "**C**", "option C", a letter ending the
   text; one after "so", "thus", "which is", "=" ... ("so (B). (A) is 10") before any other;
4. the option whose text appears last, not negated nor an operand ("so 8 + 4 = 12." where 12
   is an option, but not the 8 or 4 of "8 + 4").
A lower-case letter counts in parentheses, before ")" or ending a phrase ("answer: c"), but not
before a word: in "the answer is a prime" the "a" is an article.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

# ttrl.grading (which loads sympy) is imported where answers are read, so that loading data
# stays light and grading can build on this module.

LETTERS = string.ascii_uppercase
MIN_CHOICES, MAX_CHOICES = 2, len(LETTERS)
MAX_PHRASE_TRIES = 8  # answer phrases read from the end: keeps hostile text linear
MAX_SPAN_CHARS = 1000  # what follows a phrase that is read (GPQA options are sentences)


def render_choices(choices: Sequence[str]) -> str:
    """The options as prompt lines: "A) first\\nB) second"."""
    return "\n".join(f"{LETTERS[i]}) {text}" for i, text in enumerate(choices))


def choice_of(answer: str | None, choices: Sequence[str]) -> str | None:
    """The letter `answer` names, written as a letter ("C", "(c)", "\\text{C}") or as an option's
    text (exactly up to case and spacing, or math-equal: "\\frac12" for "0.5"); else None."""
    if not isinstance(answer, str):
        return None
    span = _unwrap(answer)
    m = _LETTER_ALONE.fullmatch(span)
    if m and m.group(1).upper() in LETTERS[: len(choices)]:
        return m.group(1).upper()
    return _option_named(span, choices)


def ambiguity(choices: Sequence[str]) -> str | None:
    """Why an answer could name two of these options, or None: an option that is itself another
    option's letter ("A" as option C), or two options equal as maths ("0.5" and "\\frac{1}{2}")."""
    letters = LETTERS[: len(choices)]
    for i, text in enumerate(choices):
        m = _LETTER_ALONE.fullmatch(_unwrap(text))
        if m and m.group(1).upper() in letters and m.group(1).upper() != letters[i]:
            other = m.group(1).upper()
            return (f"option {letters[i]} is {text!r}, the letter of option {other}, so an answer {other!r} would "
                    "name both; write such options as words (e.g. 'the letter A')")
    maths = [i for i, text in enumerate(choices) if _is_math(text)]
    if len(maths) > 1:
        from ttrl.grading import is_equivalent

        for n, a in enumerate(maths):
            for b in maths[n + 1:]:
                if is_equivalent(choices[a], choices[b]):
                    return (f"options {letters[a]} and {letters[b]} ({choices[a]!r}, {choices[b]!r}) are equal as "
                            "maths, so an answer naming one would name both; each option must be a different value")
    return None


def extract_choice(text: str | None, choices: Sequence[str]) -> str | None:
    """Letter of the option a completion finally commits to (see module doc); None = no answer."""
    from ttrl.grading import TAIL_CHARS, last_boxed

    if not isinstance(text, str) or not text or not choices:
        return None
    tail = text[-TAIL_CHARS:]
    boxed = last_boxed(tail)
    if boxed is not None:
        return _read(boxed, choices, whole=True)
    for phrase in list(_PHRASE.finditer(tail))[::-1][:MAX_PHRASE_TRIES]:
        found = _read(tail[phrase.end(): phrase.end() + MAX_SPAN_CHARS], choices, whole=False)
        if found:
            return found
    listing = _restated_lines(tail, choices)
    mentions = [(m, next(g for g in m.groups() if g).upper()) for m in _MENTION.finditer(tail)]
    mentions = [(m, letter) for m, letter in mentions
                if letter in LETTERS[: len(choices)] and not _negated(tail, m.start(), m.end())
                and not any(a <= m.start() < b for a, b in listing)]
    committed = [letter for m, letter in mentions if _COMMIT.search(tail[max(0, m.start() - 24): m.start()])]
    if committed or mentions:
        return (committed or [letter for _, letter in mentions])[-1]
    return _last_option_text(tail, choices, listing)


# ---------------------------------------------------------------- reading one answer span

_WRAPPERS = re.compile(r"^(?:\\(?:text|textbf|mathrm|mathbf|boxed)\s*\{|\\[(\[]|[\s*${:\"'“”‘’])+")
_CLOSERS = re.compile(r"(?:\\[)\]]|[\s*$}.\"'“”‘’])+$")
_LETTER_ALONE = re.compile(r"\(?([A-Za-z])\)?[.:]?")
# A letter opening an answer: "(C)", "C)", "C." or "C" before a non-letter, "c" only at the end.
_LETTER_FIRST = re.compile(r"(?:(?i:option|choice|letter)\s*)?(?:\(([A-Za-z])\)|([A-Za-z])\)"
                           r"|([A-Z])(?![A-Za-z])|([a-z])[.*}$\s]*(?:$|\n))")
_PAREN_LETTER = re.compile(r"(?<![A-Za-z0-9_])\(([A-Z])\)")
_SENTENCE_END = re.compile(r"\n|\.(?:\s|$)")
_NOT = re.compile(r"(?:not|n't|never)\b", re.IGNORECASE)


def _unwrap(span: str) -> str:
    """Drop surrounding `$`, `**`, `\\text{}`, `\\(`, spaces and a final period."""
    return _CLOSERS.sub("", _WRAPPERS.sub("", span.strip()))


def _read(span: str, choices: Sequence[str], whole: bool) -> str | None:
    """The option a span names: a `\\boxed{}` content (`whole`) or what follows an answer phrase."""
    span = _WRAPPERS.sub("", span)
    if _NOT.match(span):
        return None  # "the answer is not (A)"
    m = _LETTER_FIRST.match(span)
    if m:
        letter = next(g for g in m.groups() if g).upper()
        return letter if letter in LETTERS[: len(choices)] else None
    if not whole:
        end = _SENTENCE_END.search(span)
        span = span[: end.start()] if end else span
    for inner in reversed(list(_PAREN_LETTER.finditer(span))):  # "42 (C)", "neither (A) nor (B): (C)"
        if inner.group(1) in LETTERS[: len(choices)] and not _negated(span, inner.start(), inner.end()):
            return inner.group(1)
    return _option_named(_unwrap(span), choices) or _option_named(_unwrap(span.split(", ")[0]), choices)


def _option_named(span: str, choices: Sequence[str]) -> str | None:
    """Letter of the option whose text `span` is, exactly up to case and spacing or math-equal."""
    key = _norm(span)
    if not key:
        return None
    for i, text in enumerate(choices):
        if _norm(text) == key:
            return LETTERS[i]
    if _is_math(span):
        from ttrl.grading import is_equivalent

        for i, text in enumerate(choices):
            if _is_math(text) and is_equivalent(span, text):
                return LETTERS[i]
    return None


def _norm(text: str) -> str:
    return " ".join(_unwrap(text).casefold().split())


def _is_math(text: str) -> bool:
    """A number or formula, not prose: sympy would read "ab" and "ba" as one product."""
    return bool(re.search(r"\d", text)) and not re.search(r"[a-zA-Z]{2,}", re.sub(r"\\[a-zA-Z]+", "", text))


# ---------------------------------------------------------------- scanning a whole completion

_PHRASE = re.compile(
    r"\banswer\b\**\s*(?:is|would be|must be|should be|will be)?\s*(?::|=)?\**"
    r"|(?:correct|right|best|final)\s+(?:option|choice|letter)\**\s*(?:is|would be|must be)?\s*:?\**"
    r"|\b(?:(?:I|we)(?:'ll| will)?\s+)?(?:choose|pick|select|go with)\b|####",
    re.IGNORECASE,
)
_MENTION = re.compile(
    r"(?<![A-Za-z0-9_\\])\(([A-Za-z])\)"  # (C) (c)
    r"|(?<![A-Za-z0-9_\\(])([A-Z])\)|(?m:^[ \t*-]*([a-z])\))"  # C), or c) opening a line
    r"|\*\*\(?([A-Z])\)?[.:]?\*\*"  # **C**
    r"|(?i:\b(?:option|choice))\s+\(?([A-Z])(?![A-Za-z])"  # option C
    r"|(?m:^[ \t*-]*([A-Z])[.:][ \t])"  # "C. 42" or "C: 42" at the start of a line
    r"|(?<![A-Za-z0-9_\\])([A-Z])(?=\s+is\s+(?:the\s+)?(?:correct|right|answer|true)\b)"  # C is correct
    r"|(?<![A-Za-z0-9_\\])([A-Z])[.!]?\s*$"  # ... so B.
)
_NEGATED_BEFORE = re.compile(
    r"(?:\bnot|n't|\bnever|\bneither|\bnor|\beliminat\w*|\brul\w* out|\bexclud\w*|\bexcept|\binstead of"
    r"|\bagainst|\bthan)\s+(?:be\s+)?(?:option\s+|choice\s+)?[*$(]*$", re.IGNORECASE)
_COMMIT = re.compile(r"(?:\bso|\bthus|\btherefore|\bhence|\bwhich is|\bthat is|\bgives|\bmatches|\bleav\w+"
                     r"|\bchoose|\bpick|\bselect|\bgo with|=|→)[\s,:]*(?:option\s+|choice\s+)?[*$(]*$", re.IGNORECASE)
_CLAUSE = re.compile(r"[^,;\n(]{0,40}")  # what is said of a mention, up to the next clause or mention
_NEGATIVE = re.compile(r"\b(?:not|wrong|incorrect|false|impossible|too|eliminated|excluded|ruled out|cannot)\b"
                       r"|n't\b|✗", re.IGNORECASE)


def _negated(tail: str, start: int, end: int) -> bool:
    """"not (A)", "rule out A", "(A) is wrong", "(D) 16: too big"."""
    return bool(_NEGATED_BEFORE.search(tail[max(0, start - 24): start])
                or _NEGATIVE.search(_CLAUSE.match(tail, end).group()))


_LINE_OPTION = re.compile(r"(?m)^[ \t*-]*\(?([A-Z])[).:][ \t]*(.*?)[ \t]*$")


def _restated_lines(tail: str, choices: Sequence[str]) -> list[tuple[int, int]]:
    """Spans of lines that restate an option ("B) 12" for option B = 12), when there are at least
    two: a model copying the list is not answering; one such line alone is an answer."""
    own = {LETTERS[i]: _norm(text) for i, text in enumerate(choices)}
    spans = [(m.start(), m.end()) for m in _LINE_OPTION.finditer(tail) if own.get(m.group(1)) == _norm(m.group(2))]
    return spans if len(spans) >= 2 else []


_OPERAND_BEFORE = re.compile(r"[-+*/×÷^]\s*$")
_OPERAND_AFTER = re.compile(r"\s*[-+*/×÷^]")


def _last_option_text(tail: str, choices: Sequence[str], skip: list[tuple[int, int]]) -> str | None:
    """Letter of the option whose text occurs last (outside restated lines), not negated ("not 7")
    nor an operand ("0 + 7 is an integer": the question restated); longer text wins a tie."""
    low = tail.casefold()
    best = None  # (end, length, letter)
    for i, text in enumerate(choices):
        key = " ".join(text.casefold().split())
        if not key:
            continue
        pattern = re.compile(r"(?<![\w.])" + r"\s+".join(map(re.escape, key.split())) + r"(?![\w]|\.\d)")
        for m in pattern.finditer(low):
            if (not any(a <= m.start() < b for a, b in skip) and not _negated(low, m.start(), m.end())
                    and not _OPERAND_BEFORE.search(low, max(0, m.start() - 3), m.start())
                    and not _OPERAND_AFTER.match(low, m.end())):
                candidate = (m.end(), len(key), LETTERS[i])
                best = max(best, candidate) if best else candidate
    return best[2] if best else None
