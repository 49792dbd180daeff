"""Answer extraction and math equivalence: the grader behind every vote and every score.

`extract_answer` finds the final answer of a completion; `is_equivalent` decides whether two
answers are the same mathematical object. math-verify (sympy) is the backbone; a normalised
string / exact-rational fast path in front of it answers most pairs without sympy, and caches
make every distinct pair cost one judgement.

Decisions (each one tested in tests/test_grading.py):
- `\\%`, `^\\circ`, `\\$` and a trailing `\\text{unit}` are units and dropped: "5\\%" == "5",
  "90^\\circ" == "90", "10\\text{ cm}" == "10". A percentage is *not* its fraction
  ("5\\%" != "0.05"); math-verify accepts both, which would make the relation intransitive.
- "025" == "25" (AIME), "142.0" == "142" (AMC); decimals match fractions to 6 places
  like math-verify ("0.333333" == "\\frac13", "0.333" != "\\frac13").
- "x = 5" == "5"; multiple-choice letters "B" == "(B)" == "\\text{(B)}", and two capital
  letters are equal only when identical (never by sympy).
- Plain words ("\\text{Evelyn}", "east") compare case-insensitively as strings, never by sympy
  (which would read "east" as the product e*a*s*t).

Time is bounded, in any thread (math-verify's `signal.alarm` fails outside the main one):
- Extraction scans only the end of a completion, with a bounded number of tries: linear time.
- Answers sympy may not finish are compared by normalised string only and never reach it: long
  (over 1000 characters: also never cached), deeply nested, power towers, big exponents,
  factorials or binomials (`\\binom{10^6}{5 \\cdot 10^5}` takes sympy minutes), polynomials of
  total degree over 100 (`(x+1)^{100}(x-1)^{100}(x+2)^{100}`), integrals, limits, sums.
- Every judgement that does reach sympy has a hard budget: JUDGE_CPU_SECONDS of the thread's
  CPU time (so machine load does not change verdicts) or JUDGE_WALL_SECONDS of wall time;
  ttrl.deadline interrupts it, in any thread. **A judgement that runs out of time counts as
  "not equivalent"**, is cached like any other, and its longer answer is compared by string
  only from then on, so one pathological sample costs a vote at most one budget, never a hang.
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache
from typing import Sequence

import math_verify.grader
import math_verify.parser
from math_verify import parse, verify
from sympy import Expr, Float, Max, Rational, nan, oo, zoo

from ttrl.choices import extract_choice
from ttrl.deadline import DeadlineExceeded, call_within

# We pass timeouts of None on purpose (see above); silence math-verify's one-time warning about it.
math_verify.grader.TIMEOUT_WARNING_SHOWN = math_verify.parser.TIMEOUT_WARNING_SHOWN = True

MAX_CACHED_CHARS = 1000  # longer answers are compared as normalised strings, uncached
MAX_SYMBOLIC_CHARS = 400  # longer normalised answers never reach sympy
MAX_BRACE_DEPTH = 12
MAX_EXPONENT = 1000  # 2^{1001}, 10^{10^{10}}, 2000! and the like never reach sympy
MAX_SYMBOLIC_EXPONENT = 100  # (x+1)^{101} or x^{60}(x+1)^{60} (total degree): simplify may take seconds
MAX_BINOMIAL = 10_000  # \binom{20000}{10000} takes sympy 30 ms, \binom{300000}{150000} 7 s
JUDGE_CPU_SECONDS = 1.0  # hard budget of one sympy judgement (typical: 2-100 ms) in CPU time ...
JUDGE_WALL_SECONDS = 3.0  # ... and in wall time (a thread starved of CPU returns too)
MAX_TOO_SLOW = 4096  # answers remembered as too slow for sympy (forgotten all at once beyond)
TAIL_CHARS = 4000  # "the answer is" is looked for only in the end of a completion
NUMBER_TAIL_CHARS = 500
MAX_BOX_TRIES = 4  # unbalanced \boxed{ candidates tried from the end, keeps extraction linear

_CHOICE = r"[A-J]"

# ---------------------------------------------------------------- extraction


CUSTOM: dict = {"extract": None, "equivalent": None}
"""The user's answer extractor and equivalence (data.answer_extractor / answer_equivalence), when
installed by ttrl.plugins.use_answer_checker: every stage reads answers through the two functions
below, which then defer to them."""


def extract_answer(text: str) -> str | None:
    """Final answer of a completion; None = no answer (never wins a vote, reward 0).

    With a custom extractor installed, its answer (a blank one counts as none). Else tries, in order: the last `\\boxed{}`/`\\fbox{}`; the later of "the answer is X" /
    "Answer: X" and "#### X"; the last number (or "(B)") near the end, unless it is the
    right operand of an expression left unevaluated ("9 + 8": no answer).
    """
    if not isinstance(text, str) or not text:
        return None
    if CUSTOM["extract"] is not None:
        answer = CUSTOM["extract"](text)
        return str(answer) if answer is not None and str(answer).strip() else None
    for found in (last_boxed(text), _answer_phrase(text), _last_number(text)):
        answer = _clean(found) if found is not None else None
        if answer:
            return answer
    return None


def sample_answers(texts: list[str], truncated: list[bool],
                   choices: Sequence[Sequence[str] | None] | None = None) -> list[str | None]:
    """Final answers of sampled completions. One cut off by max_new_tokens has none: whatever
    number it ends on is mid-sentence, and counting it lets a policy win the vote by restating
    the question ("To add 8 + 1," votes 1), which a TTRL run on SmolLM2 learnt within 10 steps.

    `choices`, per sample: the options of its multiple-choice problem (None: an open answer);
    the answer of such a sample is the letter of the option it commits to (ttrl.choices)."""
    options = choices if choices is not None else [None] * len(texts)
    return [None if cut else extract_choice(t, opts) if opts else extract_answer(t)
            for t, cut, opts in zip(texts, truncated, options)]


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{}`/`\\fbox{}` (None if there is none)."""
    end = len(text)
    for _ in range(MAX_BOX_TRIES):
        starts = [(text.rfind(cmd, 0, end), cmd) for cmd in ("\\boxed", "\\fbox")]
        start, cmd = max(starts)
        if start < 0:
            return None
        content = _box_argument(text, start + len(cmd))
        if content:
            return content
        end = start
    return None


_BARE_TOKEN = re.compile(r"[^\s$]+")


def _box_argument(text: str, start: int) -> str | None:
    """The `{...}` group (nested braces, `\\{` skipped) or the bare token of `\\boxed 5`."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == "\\":
                j += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
            j += 1
        return None  # unbalanced
    token = _BARE_TOKEN.match(text, i) if i > start else None
    return token.group() if token else None


_PHRASE = re.compile(r"answer\**\s*(?:is\b\s*:?|:|=)\s*\**|####", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\n|\.(?:\s|$)")
# "The answer is 12, since 5 + 7 = 12": the answer ends where a reason or a hedge begins. Only
# words that cannot continue an answer ("2, 3 and 4" stays whole).
_CLAUSE = re.compile(r",\s*(?:since|because|as|so|which|but|hence|thus|therefore|given)\b|\s+(?:since|because)\b",
                     re.IGNORECASE)
_MATH_SPANS = [  # (opener, regex of the closer that is not an escaped `\$`)
    (opener, re.compile(r"(?<!\\)" + re.escape(closer)))
    for opener, closer in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
]


def _answer_phrase(text: str) -> str | None:
    tail = text[-TAIL_CHARS:]
    last = None
    for last in _PHRASE.finditer(tail):
        pass
    if last is None:
        return None
    rest = tail[last.end() :].lstrip()
    for opener, closer in _MATH_SPANS:
        close = closer.search(rest, len(opener)) if rest.startswith(opener) else None
        if close:
            return rest[len(opener) : close.start()]
    end = _SENTENCE_END.search(rest)
    phrase = rest[: end.start()] if end else rest
    clause = _CLAUSE.search(phrase)
    return phrase[: clause.start()] if clause else phrase


_NUMBER = re.compile(rf"-?\d+(?:,\d{{3}})*(?:\.\d+)?(?:/\d+)?|\(({_CHOICE})\)")


# "9 + 8" ends on an operand, not an answer: what precedes the last number when it is one. A
# minus touching the digits is part of the number ("-3"), so "8-3" is caught by _MINUS_OF.
_OPERAND_BEFORE = re.compile(r"[\w)]\s*(?:[-+*×÷]|plus|minus|times)\s*$")
_MINUS_OF = re.compile(r"[\w)]$")


def _last_number(text: str) -> str | None:
    """The last number near the end, unless it is the right operand of an unevaluated sum,
    difference or product: a policy that restates the question ("9 + 8") must not vote 8."""
    tail = text[-NUMBER_TAIL_CHARS:]
    last = None
    for last in _NUMBER.finditer(tail):
        pass
    if last is None:
        return None
    before = tail[max(0, last.start() - 40) : last.start()]
    if last.group(1) is None and (_OPERAND_BEFORE.search(before)
                                  or (last.group(0).startswith("-") and _MINUS_OF.search(before))):
        return None
    return last.group(1) or last.group(0).replace(",", "")


_CONTROL = {i: None for i in [*range(0, 9), *range(11, 32), 127]}
_CHOICE_FORMS = re.compile(
    rf"\(?({_CHOICE})\)?|\\(?:text|textbf|mathrm|mathbf)\{{\s*\(?({_CHOICE})\)?\s*\}}"
)


def _clean(answer: str) -> str | None:
    """Strip control chars, `$`, `\\(...\\)`, bold, trailing periods; reduce "(B)" to "B"."""
    answer = answer.translate(_CONTROL)
    for _ in range(2):  # a fixed number of passes keeps this linear on hostile input
        answer = answer.lstrip(" \t\n\r*$").rstrip(" \t\n\r*$.")
        for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
            if answer.startswith(opener) and answer.endswith(closer):
                answer = answer[len(opener) : -len(closer)]
    choice = _CHOICE_FORMS.fullmatch(answer)
    if choice:
        answer = choice.group(1) or choice.group(2)
    return answer or None


# ---------------------------------------------------------------- equivalence


def is_equivalent(a: str | None, b: str | None) -> bool:
    """Math equivalence, cached per distinct (a, b) pair, never raises, bounded time.

    None is equivalent to nothing; neither is an empty answer. Symmetric. With a custom
    equivalence installed, its judgement of two non-empty answers.
    """
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    if CUSTOM["equivalent"] is not None:
        return bool(a.strip() and b.strip()) and bool(CUSTOM["equivalent"](a, b))
    if a == b:
        return bool(a.strip())
    if max(len(a), len(b)) > MAX_CACHED_CHARS:  # keeps the caches small and sympy away
        na = _normalise(a)
        return bool(na) and na == _normalise(b)
    return _equivalent_pair(a, b) if a < b else _equivalent_pair(b, a)


def cache_clear() -> None:
    """Forget every cached judgement (benchmarks time a cold cache with this)."""
    for cached in (_equivalent_pair, _canonical, _parsed):
        cached.cache_clear()
    _TOO_SLOW.clear()


_TOO_SLOW: set[str] = set()  # normalised answers that ran a judgement out of time


@lru_cache(maxsize=1 << 15)
def _equivalent_pair(a: str, b: str) -> bool:
    try:
        return _judge(a, b)
    except DeadlineExceeded:  # blame the longer answer: the shorter is usually a plain number
        if len(_TOO_SLOW) >= MAX_TOO_SLOW:
            _TOO_SLOW.clear()
        _TOO_SLOW.add(max(_canonical(a)[0], _canonical(b)[0], key=len))
        return False
    except Exception:  # sympy and latex2sympy raise anything; a grader must not
        return False


def _judge(a: str, b: str) -> bool:
    na, ra, fa = _canonical(a)
    nb, rb, fb = _canonical(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    if _CAPITAL.fullmatch(na) and _CAPITAL.fullmatch(nb):
        return False  # choice letters are equal only when identical (sympy might read E as e)
    if ra is not None and rb is not None:
        return ra == rb or ((fa or fb) and round(ra, 6) == round(rb, 6))
    if _is_word(na) or _is_word(nb):
        return na.lower() == nb.lower()
    if (ra is not None and _is_compound(nb)) or (rb is not None and _is_compound(na)):
        return False  # a number is never a tuple, set, interval or matrix
    if _is_risky(na) or _is_risky(nb):
        return False  # equal normalised strings were caught above
    return call_within(JUDGE_CPU_SECONDS, JUDGE_WALL_SECONDS, _symbolic_equal, na, nb)


def _symbolic_equal(na: str, nb: str) -> bool:
    """math-verify on two normalised answers, after a cheap numeric disproof."""
    pa, pb = _parsed(na), _parsed(nb)
    if _numerically_different(pa, pb):
        return False
    if verify(pa, pb, timeout_seconds=None):
        return True
    # math-verify is asymmetric only for relations (gold "x=5" simplifies the prediction)
    relational = any(c in na + nb for c in "=<>") or "\\in" in na + nb
    return relational and verify(pb, pa, timeout_seconds=None)


@lru_cache(maxsize=1 << 14)
def _parsed(normalised: str) -> list:
    return parse("\\boxed{" + normalised + "}", parsing_timeout=None)


def _numerically_different(pa: list, pb: list) -> bool:
    """Disprove equality of two expressions by evaluating them at one point.

    Why: sympy's simplify inside math-verify costs ~20 ms a pair and most pairs in a vote are
    unequal; a numeric difference far above math-verify's 6-place rounding is a cheap proof.
    """
    if not pa or not pb or not isinstance(pa[0], Expr) or not isinstance(pb[0], Expr):
        return False
    x, y = pa[0], pb[0]
    symbols = sorted(x.free_symbols | y.free_symbols, key=str)
    point = {s: Rational(-7 + 9 * i, 10 + 3 * i) for i, s in enumerate(symbols)}
    try:  # sympy Floats, not Python floats: (x+1)^{1000} must not overflow
        vx, vy = x.subs(point).evalf(20), y.subs(point).evalf(20)
        if not (vx.is_number and vy.is_number) or (vx + vy).has(nan, zoo, oo, -oo):
            return False
        return bool(abs(vx - vy) > Float(1e-4) * Max(1, abs(vx), abs(vy)))
    except Exception:  # unevaluable or incomparable: let math-verify decide
        return False


# ---------------------------------------------------------------- normalisation

_SPACING = re.compile(r"\\\\|\\[,;:! ]|\\(?:left|right|displaystyle|q?quad)(?![a-zA-Z])|~")
_SPACE = re.compile(r"(?<![a-zA-Z])\s+|\s+(?![a-zA-Z])")
_FRAC_ARGS = re.compile(r"\\frac(\d|\{[^{}]*\})(\d|\{[^{}]*\})")
_UNITS = re.compile(
    r"\^\{?\\circ\}?|\\circ$|°|\\degree|\\%|%|\\\$|\$"
    r"|(?<=.)\\(?:text|mbox|mathrm)\{[^{}]*\}(?:\^\{?[23]\}?)?$"
)
_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\{([^{}]*)\}")
_ASSIGNMENT = re.compile(r"[a-zA-Z](?:_\{?\w+\}?)?=([^=]+)")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


@lru_cache(maxsize=1 << 14)
def _canonical(answer: str) -> tuple[str, Fraction | None, bool]:
    """(normalised string, exact value if a plain number, whether written as a decimal)."""
    s = _normalise(answer)
    if len(s) > MAX_SYMBOLIC_CHARS:
        return s, None, False
    value, is_decimal = _rational(s)
    if value is not None:
        s = str(value)
    return s, value, is_decimal


def _normalise(answer: str) -> str:
    s = answer.translate(_CONTROL).strip()
    s = _SPACING.sub(lambda m: m.group() if m.group() == "\\\\" else "", s)
    s = _SPACE.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    if len(s) > MAX_SYMBOLIC_CHARS:
        return s  # compared as a string only; skip the rest to stay linear
    for _ in range(2):  # units can hide under a wrapper and a wrapper under units
        s = _UNITS.sub("", s)
        whole = _WRAPPER.fullmatch(s)
        if whole:
            s = whole.group(1).strip()
    s = _clean(s) or ""
    s = _FRAC_ARGS.sub(lambda m: f"\\frac{{{m.group(1).strip('{}')}}}{{{m.group(2).strip('{}')}}}", s)
    assignment = _ASSIGNMENT.fullmatch(s)
    if assignment:
        s = assignment.group(1)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


_DECIMAL = re.compile(r"[-+]?(\d*\.\d+|\d+\.?)(?:[eE]([-+]?\d{1,4}))?")
_TIMES_TEN = re.compile(r"([-+]?\d*\.?\d+)(?:\\times|\\cdot|\*)10\^\{?([-+]?\d{1,4})\}?")
_FRACTION = re.compile(r"(-?)(?:\\frac\{(-?\d+)\}\{(\d+)\}|(\d+)/(\d+))")
_MIXED = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")


def _rational(s: str) -> tuple[Fraction | None, bool]:
    """Exact value of a plain number ("025", "1.5e3", "\\frac{-1}{2}", "1\\frac45"), else None."""
    try:
        if m := _DECIMAL.fullmatch(s):
            exponent = int(m.group(2) or 0)
            if abs(exponent) > MAX_EXPONENT:
                return None, False
            return Fraction(s), "." in s or m.group(2) is not None
        if m := _TIMES_TEN.fullmatch(s):
            exponent = int(m.group(2))
            if abs(exponent) > MAX_EXPONENT:
                return None, False
            return Fraction(m.group(1)) * Fraction(10) ** exponent, "." in m.group(1)
        if m := _FRACTION.fullmatch(s):
            sign = -1 if m.group(1) else 1
            num, den = (m.group(2), m.group(3)) if m.group(2) else (m.group(4), m.group(5))
            if int(den) == 0:
                return None, False
            return sign * Fraction(int(num), int(den)), False
        if m := _MIXED.fullmatch(s):
            sign = -1 if m.group(1) else 1
            if int(m.group(4)) == 0:
                return None, False
            return sign * (int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))), False
    except (ValueError, ZeroDivisionError, OverflowError):
        pass
    return None, False


_WORD = re.compile(r"[a-zA-Z]{3,}(?:[ -][a-zA-Z]+)*")
_CAPITAL = re.compile(r"[A-Z]")


def _is_word(s: str) -> bool:
    return bool(_WORD.fullmatch(s))


def _is_compound(s: str) -> bool:
    """Tuples, sets, intervals, lists and matrices: things a single number never equals."""
    return "\\begin{" in s or "\\cup" in s or "," in _top_level(s)


def _top_level(s: str) -> str:
    """`s` with everything inside (), [], {} removed, but an outermost wrapper opened."""
    if s[:1] in "([{" or s.startswith("\\{"):
        s = s.lstrip("\\")[1:]
    out, depth = [], 0
    for c in s:
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth = max(depth - 1, 0)
        elif depth == 0:
            out.append(c)
    return "".join(out)


_RISKY_COMMANDS = ("\\int", "\\oint", "\\iint", "\\lim", "\\sum", "\\prod")
_EXPONENT = re.compile(r"(?:\^|\*\*)\s*(\{[^{}]*\}?|-?\d+|.)")
_FACTORIAL = re.compile(r"([)}]|\d+)!")
_LONG_DIGITS = re.compile(r"\d{101}")
_BINOMIAL = re.compile(r"\\[dt]?binom|\\choose")
_GROWS = re.compile(r"[\^!*]|\\cdot|\\times")


def _is_risky(s: str) -> bool:
    """True for answers sympy might not finish: too long, too deep, towers, huge powers or
    binomials, high total degree, or one that already ran a judgement out of time."""
    if len(s) > MAX_SYMBOLIC_CHARS or _LONG_DIGITS.search(s) or s in _TOO_SLOW:
        return True
    if any(cmd in s for cmd in _RISKY_COMMANDS):
        return True
    if _BINOMIAL.search(s) and (_GROWS.search(s) or any(int(d) > MAX_BINOMIAL for d in re.findall(r"\d+", s))):
        return True  # sympy computes \binom{n}{k} exactly while parsing
    depth = 0
    for c in s:
        depth += (c in "{([") - (c in "})]")
        if depth > MAX_BRACE_DEPTH:
            return True
    has_variables = re.search(r"[a-zA-Z]", re.sub(r"\\[a-zA-Z]+", "", s))
    limit = MAX_SYMBOLIC_EXPONENT if has_variables else MAX_EXPONENT
    degree = 0  # with variables: the sum of all exponents bounds the degree simplify expands to
    for m in _EXPONENT.finditer(s):
        if s[m.end() : m.end() + 1] == "^" or s[m.end() : m.end() + 2] == "**":
            return True  # 2^2^2^2: latex2sympy reads it as a tower
        exponent = m.group(1)
        unclosed = exponent.startswith("{") and not exponent.endswith("}")
        if unclosed or any(c in exponent for c in "^*!"):
            return True  # power towers, 2^{3!}, unclosed groups
        digits = re.sub(r"\D", "", exponent)
        if len(digits) > 4:
            return True
        power = int(digits or 1) * _largest_exponent(_group_before(s, m.start()))
        degree += power if has_variables else 0
        if power > limit or degree > limit:  # x^{101}, (10^{1000})^{1000} or (x+1)^{60}(x-1)^{60}
            return True
    for m in _FACTORIAL.finditer(s):  # (10^5)! or 2000!
        if not m.group(1).isdigit() or int(m.group(1)) > MAX_EXPONENT:
            return True
    return False


def _group_before(s: str, end: int) -> str:
    """The bracketed group closing just before `end` ("" if none): the base of a power."""
    if end == 0 or s[end - 1] not in ")}]":
        return ""
    depth = 0
    for i in range(end - 1, -1, -1):
        depth += (s[i] in ")}]") - (s[i] in "({[")
        if depth == 0:
            return s[i:end]
    return s[:end]


def _largest_exponent(s: str) -> int:
    return max((int(d) for d in re.findall(r"\^\{?(\d{1,4})", s)), default=1)
