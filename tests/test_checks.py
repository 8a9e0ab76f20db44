"""Generation checks: the scorers on canned outputs, and one end-to-end run on the tiny llama."""

from __future__ import annotations

from tqpipe.eval.checks import (
    CHECKS, extract_code, make_password, needle_prompt, run_checks, run_code_tests, score_arithmetic,
    score_numbered_list, tail_repeat_fraction,
)

GOOD_CODE = """
def merge_intervals(intervals):
    out = []
    for start, end in sorted(intervals, key=lambda iv: iv[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
"""

WRONG_CODE = """
def merge_intervals(intervals):
    return sorted(intervals)
"""


def test_numbered_list_passes_and_fails():
    ok = score_numbered_list("Sure:\n1. Apple\n2) Banana\n  3. Orange\n4. Mango\n5. Grape\n")
    assert ok["passed"] and ok["items_found"] == 5 and ok["items"][1] == "Banana" and ok["max_words"] == 1
    assert not score_numbered_list("1. Apple\n2. Banana\n3. Orange\n4. Mango")["passed"]
    assert not score_numbered_list("1. a\n2. b\n4. c\n3. d\n5. e")["passed"]
    assert not score_numbered_list("1. a\n2. b\n3. c\n4. d\n5. e\n6. f")["passed"]
    long = score_numbered_list("1. a\n2. b\n3. c\n4. d\n5. " + "word " * 16)
    assert not long["passed"] and long["max_words"] == 16 and "16 words" in long["detail"]
    assert score_numbered_list("no list here")["items_found"] == 0


def test_extract_code():
    assert extract_code("Here:\n```python\nx = 1\n```\nDone.") == "x = 1\n"
    assert extract_code("```\ny = 2\n```") == "y = 2\n"
    two = "```text\nnot code\n```\n```py\ndef merge_intervals(a):\n    return a\n```"
    assert extract_code(two).startswith("def merge_intervals")
    assert extract_code("```python\ndef f():\n    pass") == "def f():\n    pass"  # cut off by max tokens
    assert extract_code("def f(): pass") == "def f(): pass"


def test_run_code_tests():
    good = run_code_tests(GOOD_CODE)
    assert good["passed"] and good["returncode"] == 0 and not good["timed_out"]
    wrong = run_code_tests(WRONG_CODE)
    assert not wrong["passed"] and wrong["returncode"] != 0 and "AssertionError" in wrong["stderr_tail"]
    assert not run_code_tests("this is not python")["passed"]
    loop = run_code_tests("def merge_intervals(intervals):\n    while True:\n        pass\n", timeout=1.0)
    assert not loop["passed"] and loop["timed_out"] and "timed out" in loop["detail"]


def test_score_arithmetic():
    assert score_arithmetic("12 * 7 = 84, and 84 - 50 = 34.", 34)["passed"]
    assert score_arithmetic("The answer is **34**", 34)["parsed_answer"] == 34
    assert score_arithmetic("34.0", 34)["passed"]
    wrong = score_arithmetic("12 * 7 = 84 loaves", 34)
    assert not wrong["passed"] and wrong["parsed_answer"] == 84
    assert score_arithmetic("1,034", 1034)["passed"]
    assert score_arithmetic("no idea", 34)["parsed_answer"] is None


def test_tail_repeat_fraction():
    prose = " ".join(f"w{i}" for i in range(100))
    assert tail_repeat_fraction(prose) == 0.0
    assert tail_repeat_fraction(prose + " the end" * 60) > 0.5
    assert tail_repeat_fraction("") == 0.0 and tail_repeat_fraction("too short") == 0.0


def test_needle_prompt_with_byte_tokenizer(tiny_llama):
    from mlx_lm import load

    _, tokenizer = load(str(tiny_llama))
    password = make_password(3)
    assert password == make_password(3) and len(password) == 8 and password.isalpha() and password.islower()
    prompt, depth = needle_prompt(tokenizer, password, 200)
    assert f"The secret password is {password}." in prompt and prompt.endswith("password only.")
    assert 0.25 < depth < 0.75
    assert 180 < len(tokenizer.encode(prompt, add_special_tokens=False)) < 300


def test_run_checks_end_to_end(tiny_llama):
    from mlx_lm import load

    model, tokenizer = load(str(tiny_llama))
    report = run_checks(model, tokenizer, needle_tokens=200, essay_max_tokens=32)
    assert [c["name"] for c in report["checks"]] == list(CHECKS)
    assert report["total"] == 5 and report["passed"] == sum(c["passed"] for c in report["checks"])
    for check in report["checks"]:
        assert isinstance(check["passed"], bool) and check["detail"]
        assert check["prompt_tokens"] > 0 and len(check["output"]) <= 2000
    needle, essay = report["checks"][0], report["checks"][-1]
    assert needle["prompt_tokens"] > 200 and 0 < needle["depth"] < 1
    assert essay["tokens_generated"] <= 32 and "tail_repeat_fraction" in essay
    only = run_checks(model, tokenizer, names=["arithmetic"])
    assert [c["name"] for c in only["checks"]] == ["arithmetic"]
