"""Automatic generation checks with pass/fail: needle in a haystack, list, code, arithmetic, essay.

Each check prompts a loaded mlx-lm model greedily (through the chat template when the
tokenizer has one) and scores the output with a pure function of the text, so that the
scoring is testable on canned outputs. Generated code is only ever run in a subprocess.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import mlx.nn as nn
import numpy as np
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from tqpipe.eval.texts import pydoc_topics

log = logging.getLogger(__name__)

CHECKS = ("needle", "numbered_list", "code", "arithmetic", "essay")
OUTPUT_CHARS = 2000
LIST_PROMPT = "List five common fruits as a numbered list, one item per line, nothing else."
CODE_PROMPT = ("Write a Python function `merge_intervals(intervals)` that merges overlapping intervals "
               "given as a list of [start, end] pairs and returns the merged list sorted by start. "
               "Reply with the code in a ```python block.")
ARITHMETIC_PROMPT = ("A baker bakes 12 loaves every hour for 7 hours and sells 50 of them. "
                     "How many loaves are left? Give the final answer as a number.")
ARITHMETIC_ANSWER = 34
ESSAY_PROMPT = "Write a short essay of three paragraphs about the history of the printing press."
NEEDLE_QUESTION = "What is the secret password? Answer with the password only."

# Runs in the subprocess: loads solution.py into its own namespace and checks fixed cases.
CODE_TESTS = '''
import copy
ns = {"__name__": "solution"}
exec(compile(open("solution.py").read(), "solution.py", "exec"), ns)
f = ns["merge_intervals"]
cases = [
    ([[1, 3], [2, 6], [8, 10], [15, 18]], [[1, 6], [8, 10], [15, 18]]),
    ([[1, 4], [4, 5]], [[1, 5]]),
    ([], []),
    ([[1, 2]], [[1, 2]]),
    ([[8, 10], [1, 3], [2, 6]], [[1, 6], [8, 10]]),
    ([[1, 10], [2, 3], [4, 5]], [[1, 10]]),
    ([[5, 7], [1, 2], [3, 4]], [[1, 2], [3, 4], [5, 7]]),
]
for given, want in cases:
    got = [list(x) for x in f(copy.deepcopy(given))]
    assert got == want, f"merge_intervals({given!r}) returned {got!r}, expected {want!r}"
print("ok")
'''


# ---- scoring: pure functions of the generated text --------------------------------------

def score_numbered_list(text: str, n: int = 5, max_words: int = 15) -> dict[str, Any]:
    """Parse ``N. item`` / ``N) item`` lines; passed if exactly 1..n in order, each of at most ``max_words`` words."""
    found = [m.groups() for m in (re.match(r"^\s*(\d+)[.)]\s+(.*)", ln) for ln in text.splitlines()) if m]
    numbers, items = [int(k) for k, _ in found], [item.strip() for _, item in found]
    longest = max((len(item.split()) for item in items), default=0)
    if numbers != list(range(1, n + 1)):
        detail = f"expected items numbered 1..{n}, found numbers {numbers}"
    elif longest > max_words:
        detail = f"an item has {longest} words (> {max_words})"
    else:
        detail = f"{n} items numbered 1..{n}, longest {longest} words"
    passed = numbers == list(range(1, n + 1)) and longest <= max_words
    return {"passed": passed, "detail": detail, "items": items, "items_found": len(items), "max_words": longest}


def extract_code(text: str) -> str:
    """The fenced block that defines ``merge_intervals``, else the first python block, else the first block, else the text."""
    blocks = re.findall(r"```[ \t]*(\w*)[^\n]*\n(.*?)(?:```|\Z)", text, re.S)
    for pick in (lambda lang, code: "def merge_intervals" in code,
                 lambda lang, code: lang.lower() in ("python", "py", "python3"),
                 lambda lang, code: True):
        for lang, code in blocks:
            if pick(lang, code):
                return code
    return text


def run_code_tests(code: str, timeout: float = 10.0) -> dict[str, Any]:
    """Run ``code`` against the fixed ``merge_intervals`` tests in an isolated subprocess in a fresh temp dir."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "solution.py").write_text(code)
        (Path(tmp) / "tests.py").write_text(CODE_TESTS)
        try:
            proc = subprocess.run([sys.executable, "-I", "tests.py"], cwd=tmp, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return {"passed": False, "detail": f"timed out after {timeout:g} s", "returncode": None,
                    "timed_out": True, "stderr_tail": ""}
    passed = proc.returncode == 0 and proc.stdout.strip().endswith("ok")
    tail = "" if passed else "\n".join(proc.stderr.strip().splitlines()[-5:])
    last = tail.splitlines()[-1] if tail else f"return code {proc.returncode}"
    detail = "all merge_intervals tests pass" if passed else f"tests failed: {last[:200]}"
    return {"passed": passed, "detail": detail, "returncode": proc.returncode, "timed_out": False,
            "stderr_tail": tail}


def score_arithmetic(text: str, answer: int) -> dict[str, Any]:
    """Passed if the last number in ``text`` (commas allowed, integral decimals accepted) equals ``answer``."""
    numbers = re.findall(r"-?\d+(?:,\d{3})*(?:\.\d+)?", text)
    parsed: int | float | None = None
    if numbers:
        value = float(numbers[-1].replace(",", ""))
        parsed = int(value) if value.is_integer() else value
    passed = parsed == answer
    detail = "no number in output" if parsed is None else f"last number {parsed}, expected {answer}"
    return {"passed": passed, "detail": detail, "parsed_answer": parsed, "expected_answer": answer}


def tail_repeat_fraction(text: str, tail: float = 0.2, n: int = 4) -> float:
    """Over the last ``tail`` of the whitespace words, the fraction of word ``n``-grams that are repeats."""
    words = text.split()
    words = words[int(len(words) * (1 - tail)):]
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def make_password(seed: int = 0, length: int = 8) -> str:
    """A pronounceable lowercase word (alternating consonant and vowel) from a seeded numpy RNG."""
    rng, consonants, vowels = np.random.default_rng(seed), "bdfghklmnprstvz", "aeiou"
    return "".join(rng.choice(list(vowels if i % 2 else consonants)) for i in range(length))


def needle_prompt(tokenizer: Any, password: str, filler_tokens: int) -> tuple[str, float]:
    """Filler prose of about ``filler_tokens`` tokens with the password sentence at a sentence break near its middle."""
    ids = tokenizer.encode(pydoc_topics()[: filler_tokens * 12], add_special_tokens=False)[:filler_tokens]
    filler = tokenizer.decode(ids).rstrip("\ufffd")
    middle = len(filler) // 2
    breaks = [m.end() for m in re.finditer(r"[.:]\s+|\n\n+", filler)] or [middle]
    cut = min(breaks, key=lambda b: abs(b - middle))
    before, after = filler[:cut], filler[cut:]
    n_before = len(tokenizer.encode(before, add_special_tokens=False))
    depth = n_before / max(1, n_before + len(tokenizer.encode(after, add_special_tokens=False)))
    prompt = f"{before.rstrip()} The secret password is {password}. {after.lstrip()}\n\n{NEEDLE_QUESTION}"
    return prompt, depth


# ---- generation -------------------------------------------------------------------------

def generate(model: nn.Module, tokenizer: Any, prompt: str, max_tokens: int) -> dict[str, Any]:
    """Greedy reply to a user ``prompt`` (chat template when present): text, token counts, finish reason."""
    if getattr(tokenizer, "has_chat_template", False) or getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer.encode(chat, add_special_tokens=False)
    else:
        ids = tokenizer.encode(prompt)
    text, last = "", None
    for last in stream_generate(model, tokenizer, ids, max_tokens=max_tokens, sampler=make_sampler(0.0)):
        text += last.text
    return {"text": text, "prompt_tokens": len(ids), "tokens": last.generation_tokens if last else 0,
            "finish_reason": last.finish_reason if last else None}


def _result(name: str, gen: dict[str, Any], score: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, **score, "prompt_tokens": gen["prompt_tokens"], "output_tokens": gen["tokens"],
            "output": gen["text"][:OUTPUT_CHARS]}


def check_needle(model: nn.Module, tokenizer: Any, needle_tokens: int = 4000, seed: int = 0) -> dict[str, Any]:
    """Passed if the password buried in ~``needle_tokens`` tokens of prose appears exactly in the reply."""
    password = make_password(seed)
    prompt, depth = needle_prompt(tokenizer, password, needle_tokens)
    gen = generate(model, tokenizer, prompt, 24)
    found = password in gen["text"]
    detail = f"password {password!r} {'found' if found else 'not found'} in output"
    return _result("needle", gen, {"passed": found, "detail": detail, "password": password, "depth": round(depth, 3)})


def check_numbered_list(model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    gen = generate(model, tokenizer, LIST_PROMPT, 120)
    return _result("numbered_list", gen, score_numbered_list(gen["text"]))


def check_code(model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    gen = generate(model, tokenizer, CODE_PROMPT, 400)
    return _result("code", gen, run_code_tests(extract_code(gen["text"])))


def check_arithmetic(model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    gen = generate(model, tokenizer, ARITHMETIC_PROMPT, 200)
    return _result("arithmetic", gen, score_arithmetic(gen["text"], ARITHMETIC_ANSWER))


def check_essay(model: nn.Module, tokenizer: Any, essay_max_tokens: int = 512) -> dict[str, Any]:
    """Passed if the essay ends by itself (EOS before the limit) and its tail's 4-gram repeat fraction is <= 0.5."""
    gen = generate(model, tokenizer, ESSAY_PROMPT, essay_max_tokens)
    ended, frac = gen["finish_reason"] == "stop", tail_repeat_fraction(gen["text"])
    why = [] if ended else [f"hit the {essay_max_tokens}-token limit"]
    why += [f"tail repeat fraction {frac:.2f} > 0.5"] if frac > 0.5 else []
    detail = "; ".join(why) or f"ended by itself after {gen['tokens']} tokens, tail repeat fraction {frac:.2f}"
    return _result("essay", gen, {"passed": not why, "detail": detail, "tokens_generated": gen["tokens"],
                                  "ended_by_itself": ended, "tail_repeat_fraction": round(frac, 3)})


def run_checks(model: nn.Module, tokenizer: Any, *, needle_tokens: int = 4000, essay_max_tokens: int = 512,
               names: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run the named checks (all of ``CHECKS`` by default, in that order); count the passes."""
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "needle": lambda: check_needle(model, tokenizer, needle_tokens),
        "numbered_list": lambda: check_numbered_list(model, tokenizer),
        "code": lambda: check_code(model, tokenizer),
        "arithmetic": lambda: check_arithmetic(model, tokenizer),
        "essay": lambda: check_essay(model, tokenizer, essay_max_tokens),
    }
    names = CHECKS if names is None else tuple(names)
    unknown = [n for n in names if n not in runners]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; choose from {list(CHECKS)}")
    start = time.perf_counter()
    checks = []
    for n in (n for n in CHECKS if n in names):  # one log line per check: they take a while on a CPU
        t = time.perf_counter()
        checks.append(runners[n]())
        log.info("check %-13s %s in %.0fs: %s", n, "pass" if checks[-1]["passed"] else "FAIL",
                 time.perf_counter() - t, checks[-1]["detail"])
    return {"checks": checks, "passed": sum(c["passed"] for c in checks), "total": len(checks),
            "seconds": time.perf_counter() - start}
