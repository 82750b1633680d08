"""Verifiers: is an answer correct, and which answers are the same answer (equivalence classes).

- ``math``: Math-Verify, in a pool of worker processes with its own timeout (Math-Verify's
  signal-based timeouts only work in a main thread; pool workers run tasks in theirs);
- ``numeric``: strict answers (:mod:`katdata.answers`): a marked number (``#### N``, ``\\boxed{N}``, "the answer
  is N") or the one number of the answer, else no answer (invalid); the last number of an answer only when a
  recipe sets ``sample.verify.numeric_extraction: last_number`` (then counted apart); references: ``#### N``;
- ``choice`` / ``exact``: normalised strings (case, whitespace, punctuation, "016" equals "16");
- ``code``: HumanEval program run in :mod:`katdata.sandbox`;
- ``open``: an LLM grader (prompt in ``prompts/grade_open.txt``);
- no reference: self-consistency, the majority class is the pseudo-reference (see vote.py).

A Math-Verify worker that crashes or times out gives no verdict: :class:`VerifyError`, which the
stages count as ``verify_errors`` (apart from wrong answers) and which stops a run once more than
``verify.max_error_share`` of its verifications failed (:func:`check_error_share`).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import multiprocessing
import re
import string
import threading
from typing import Callable, Optional

from pydantic import BaseModel, ConfigDict, Field

from katdata.answers import Extraction, canonical_number, last_number, numeric_answer
from katdata.errors import KatdataError
from katdata.prompt_files import read_prompt
from katdata.sandbox import SandboxConfig, humaneval_program, require_isolation, run_python

log = logging.getLogger(__name__)

INVALID = "<invalid>"  # the class of a missing or unparseable answer; it never wins a vote


class VerifyConfig(BaseModel):
    """How answers are checked."""

    model_config = ConfigDict(extra="forbid")

    math_timeout_s: float = Field(5.0, gt=0, description="wall-clock limit of one Math-Verify call (worker killed after)")
    math_workers: int = Field(2, ge=1, description="worker processes of the Math-Verify pool")
    rel_tol: float = Field(1e-6, ge=0, description="relative tolerance of numeric answers")
    exact_contains: bool = Field(True, description="kind=exact: also correct when the answer contains the "
                                 "(normalised, at most 5-word) reference as whole words")
    grader_prompt: str = Field("grade_open.txt", description="prompt file (katdata/prompts) of the LLM grader of "
                               "open answers")
    grader_max_tokens: int = Field(8, ge=1, description="tokens the LLM grader may answer with")
    numeric_extraction: Extraction = Field(
        "strict", description="kind=numeric: 'strict' takes an answer's number only when marked (#### N, \\boxed{N}, "
        "'the answer is N', 'answer: N') or when it is the answer's one number, else the answer is invalid; "
        "'last_number' also takes the last number of any other answer (the old rule; such answers are counted apart "
        "as last_number_answers in the vote stage's statistics); the rule in full: katdata/answers.py")
    max_error_share: float = Field(0.2, ge=0.0, le=1.0, description="stop the run when more than this share of a "
                                   "stage's verifications failed (Math-Verify worker crashed or timed out)")


class VerifyError(Exception):
    """No verdict: a Math-Verify worker crashed or timed out (not the same as a wrong answer)."""


def is_verify_error(reason: Optional[str]) -> bool:
    """Whether a row's ``reason`` records a failed verification."""
    return bool(reason) and reason.startswith(("verify timeout", "verify error"))


def check_error_share(errors: int, checked: int, cfg: VerifyConfig, stage: str) -> None:
    """Stop the run (KatdataError) when more than ``cfg.max_error_share`` of ``checked`` verifications failed."""
    if checked and errors / checked > cfg.max_error_share:
        raise KatdataError(
            f"{stage}: {errors} of {checked} answer verifications failed (Math-Verify worker crashed or took over "
            f"verify.math_timeout_s = {cfg.math_timeout_s:g} s), more than verify.max_error_share = "
            f"{cfg.max_error_share:g}; raise verify.math_timeout_s or verify.math_workers and rerun (the rows of "
            f"this batch were not written)")


# ---------------------------------------------------------------- normalisation

_PUNCT = str.maketrans("", "", string.punctuation.replace(".", "").replace("-", ""))


def extract_number(text: Optional[str], rule: Extraction = "strict") -> Optional[str]:
    """The number of a numeric answer under ``rule`` (:func:`katdata.answers.numeric_answer`); None: no answer."""
    return numeric_answer(text, rule).number


def taken_by_last_number(kind: Optional[str], answer: Optional[str]) -> bool:
    """Whether a numeric answer has a number only by the last-number rule (no marked number, not the one number)."""
    return kind == "numeric" and numeric_answer(answer, "last_number").how == "last_number"


def normalize(text: Optional[str]) -> Optional[str]:
    """Case, whitespace and punctuation folded; a lone number becomes its canonical form."""
    if text is None:
        return None
    t = " ".join(text.strip().lower().translate(_PUNCT).split()).strip(" .")
    if not t:
        return None
    num = canonical_number(t)
    if num is not None:
        return num
    t = re.sub(r"^(the|a|an) ", "", t)
    return re.sub(r"\b0+(\d)", r"\1", t)


_OPTION = r"\(?[a-z]\)?"
_OPTION_LIST = re.compile(rf"^{_OPTION}(?:\s*(?:,|;|/|&|\band\b|\bor\b)\s*{_OPTION})+(?=[\s.,;:)!]|$)")


def normalize_choice(text: Optional[str]) -> Optional[str]:
    """A multiple-choice letter: 'B', '(b)', 'B) foo', 'answer: B' -> 'b'. An answer that lists several
    options ('A and C', 'A, B', 'B or D') -> the sorted letters 'a,c', which matches only a reference
    that lists the same options."""
    if not text:
        return None
    t = re.sub(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*:?\s*", "", text.strip().lower())
    several = _OPTION_LIST.match(t)
    if several:
        return ",".join(sorted(set(re.findall(r"\b[a-z]\b", several.group(0)))))
    m = re.search(r"(?:^|answer\s*(?:is)?\s*:?\s*)\(?([a-z])\)?(?:[\s.):,;]|$)", text.strip().lower())
    return m.group(1) if m else normalize(text)


# ---------------------------------------------------------------- math via a worker pool

STARTUP_S = 120.0


def _warm() -> None:
    try:
        import math_verify  # noqa: F401
    except ImportError:  # the verdict functions then fail per call, as they should
        pass


def _mv_parse(text: str) -> Optional[str]:
    from math_verify import parse

    got = parse(text)
    return str(got[0]) if got else None


def _mv_equal(a: str, b: str) -> bool:
    from math_verify import parse, verify

    pa, pb = parse(a), parse(b)
    return bool(pa and pb and verify(pb, pa))


class MathPool:
    """A lazily started pool of spawned workers; a call past its timeout kills and restarts the pool."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0):
        self.workers, self.timeout_s = workers, timeout_s
        self._pool = None
        self._lock = threading.Lock()
        self.timeouts = 0
        self.errors = 0

    def _get(self):
        if self._pool is None:
            # Workers import Math-Verify as they start; wait for that once with a generous limit,
            # so start-up on a busy machine is not mistaken for a hung call.
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers, initializer=_warm)
            self._pool.apply_async(_warm).get(timeout=STARTUP_S)
        return self._pool

    def call(self, fn: Callable, *args):
        """``fn(*args)`` in a worker; VerifyError when the worker fails, crashes or times out.

        Math-Verify itself returns "no parse" / "not equal" for odd input (``raise_on_error=False``),
        so an exception here is a failure of the verifier, never a verdict on the answer.
        """
        try:
            with self._lock:
                pool = self._get()
            job = pool.apply_async(fn, args)
            return job.get(timeout=self.timeout_s)
        except multiprocessing.TimeoutError:
            short = tuple(repr(a)[:80] for a in args)
            log.warning("Math-Verify took over %.3g s on %r (or its worker crashed); restarting its workers",
                        self.timeout_s, short)
            self.timeouts += 1
            self.close()
            raise VerifyError(f"verify timeout: Math-Verify gave no result within {self.timeout_s:g} s") from None
        except Exception as exc:
            log.warning("Math-Verify failed on %r: %s: %s", tuple(repr(a)[:80] for a in args), type(exc).__name__, exc)
            self.errors += 1
            raise VerifyError(f"verify error: Math-Verify failed ({type(exc).__name__}: {str(exc)[:120]})") from None

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.terminate()
                self._pool.join()
                self._pool = None


_POOLS: dict[tuple, MathPool] = {}


def math_pool(cfg: VerifyConfig) -> MathPool:
    key = (cfg.math_workers, cfg.math_timeout_s)
    if key not in _POOLS:
        _POOLS[key] = MathPool(*key)
    return _POOLS[key]


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()


def _strip_tags(text: str) -> str:
    return re.sub(r"</?(judge|think_on|think_off|think|answer)>", " ", text)


# ---------------------------------------------------------------- the verifier

class Verifier:
    """Checks answers of one kind; ``key`` gives a class key, ``same`` merges keys that differ.

    ``key``, ``same`` and ``check`` raise :class:`VerifyError` when Math-Verify fails (kind math);
    ``correct`` turns that into None (no verdict).
    """

    def __init__(self, cfg: Optional[VerifyConfig] = None, grader=None, sandbox: Optional[SandboxConfig] = None):
        self.cfg = cfg or VerifyConfig()
        self.sandbox = sandbox or SandboxConfig()  # the recipe's `sandbox:` section, handed over by the stage
        self.grader = grader  # a Backend that grades open answers (kind="open")

    def key(self, kind: Optional[str], answer: Optional[str], query=None) -> Optional[str]:
        """The class key of an answer, or None when there is no usable answer."""
        if answer is None or not answer.strip():
            return None
        if kind == "numeric":
            return extract_number(answer, self.cfg.numeric_extraction)
        if kind == "choice":
            return normalize_choice(answer)
        if kind == "math":
            got = math_pool(self.cfg).call(_mv_parse, _strip_tags(answer))
            return got if got is not None else normalize(answer)
        if kind == "code":
            code = extract_code(answer)
            return "code-" + hashlib.sha256(code.encode()).hexdigest()[:12] if code.strip() else None
        return normalize(answer)

    def same(self, kind: Optional[str], a: str, b: str) -> bool:
        """Two class keys that differ as strings but denote the same answer (math only)."""
        if a == b:
            return True
        if kind == "math":
            return bool(math_pool(self.cfg).call(_mv_equal, a, b))
        if kind == "numeric":
            return _close(a, b, self.cfg.rel_tol)
        return False

    def can_check(self, kind: Optional[str], reference: Optional[str]) -> bool:
        """Whether verdicts exist for this query (a reference, and a grader engine for open answers)."""
        return reference is not None and (kind != "open" or self.grader is not None)

    def correct(self, kind: Optional[str], answer: Optional[str], reference: Optional[str], query=None,
                key: Optional[str] = None) -> Optional[bool]:
        """True/False against the reference; None when there is no reference or no verdict."""
        try:
            return self.check(kind, answer, reference, query, key)
        except VerifyError as exc:
            log.debug("no verdict: %s", exc)
            return None

    def check(self, kind: Optional[str], answer: Optional[str], reference: Optional[str], query=None,
              key: Optional[str] = None) -> Optional[bool]:
        """Like ``correct``, but a failed Math-Verify worker raises VerifyError instead of giving None. ``key``: the
        answer's `key` when the caller has it already (it is not worked out again)."""
        if not self.can_check(kind, reference):
            return None
        if answer is None or not answer.strip():
            return False
        if kind == "code":
            return self.check_code(answer, reference, query)
        if kind == "open":
            return self.grade_open(query, answer, reference)
        ref_key = last_number(reference) if kind == "numeric" else self.key(kind, reference)  # a reference is trusted
        got = self.key(kind, answer) if key is None else key
        if got is None or ref_key is None:
            return False
        if self.same(kind, got, ref_key):
            return True
        if kind in ("exact", None) and self.cfg.exact_contains and len(ref_key.split()) <= 5:
            return f" {ref_key} " in f" {got} "
        return False

    def check_code(self, answer: str, test: str, query=None) -> bool:
        prompt_text = (getattr(query, "meta", None) or {}).get("prompt")
        program = humaneval_program(extract_code(answer), test, prompt_text)
        result = run_python(program, self.sandbox)
        if result.reason and result.reason.startswith("sandbox setup failed"):  # the program never ran
            raise VerifyError(f"verify error: {result.reason}")
        return result.ok

    def code_isolation(self, queries) -> Optional[str]:
        """Before any sampling: the isolation code checks will run under ("bwrap", or "unisolated" when
        the recipe allows that), None when no query needs one; raises when none works."""
        if any(q.kind == "code" and q.reference is not None for q in queries):
            return "bwrap" if require_isolation(self.sandbox) == "bwrap" else "unisolated"
        return None

    def grade_open(self, query, answer: str, reference: str) -> Optional[bool]:
        """Ask the grader model; None when there is no grader or its reply does not parse."""
        if self.grader is None:
            return None
        from katdata.backends.base import Request, SamplingParams

        text = grader_prompt(self.cfg).format(query=getattr(query, "query", query or ""),
                                              reference=reference, answer=answer)
        out = self.grader.generate([Request([{"role": "user", "content": text}])],
                                   SamplingParams(max_tokens=self.cfg.grader_max_tokens))
        return parse_verdict(out[0][0].text)


def grader_prompt(cfg: VerifyConfig) -> str:
    """The prompt template of the LLM grader of open answers ({query}, {reference}, {answer})."""
    return read_prompt(cfg.grader_prompt)


_VERDICT = re.compile(r"\b(not\s+)?(incorrect|correct|wrong|right|yes|no)\b")


def parse_verdict(text: str) -> Optional[bool]:
    """The grader's reply: 'correct' / 'yes' / 'right' -> True; 'incorrect' / 'wrong' / 'no' and any
    'not ...' ('Not correct.') -> False; the first such word decides; None when none appears."""
    m = _VERDICT.search(text.lower())
    if not m:
        return None
    negated, word = m.group(1) is not None, m.group(2)
    if word in ("correct", "right", "yes"):
        return not negated
    return False if not negated else None  # "not wrong" says nothing clear


def _close(a: str, b: str, rel_tol: float) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return abs(x - y) <= rel_tol * max(1.0, abs(x), abs(y))


def extract_code(answer: str) -> str:
    """The code of an answer: the fenced blocks when there are any, else the whole text."""
    blocks = re.findall(r"```(?:python|py)?[ \t]*\n(.*?)```", answer, re.S)
    return "\n\n".join(blocks) if blocks else answer


def assign_class(kind: Optional[str], key: Optional[str], seen: list[str], verifier: Verifier) -> str:
    """Map a key onto an existing class of ``seen`` when they are the same answer; INVALID for None."""
    if key is None:
        return INVALID
    for other in seen:
        if verifier.same(kind, key, other):
            return other
    seen.append(key)
    return key
