"""Throughput and agreement of rgra's answers_equal against Math-Verify on the same pairs.

Pairs are built from the gold answers of the files in shared/data: each gold is paired
with itself re-written in an equivalent notation and with a near-miss that is not equal.
With --public, instead: agreement of rgra's grader and of Math-Verify with the public grader
cases of bench/grader_cases.jsonl (the expected values their sources assert), and the seconds of
one pass, each grader in a fresh process; without Math-Verify installed, rgra's agreement only.
Usage:  python bench/bench_grader.py [--data DIR] [--n N] [--seed S]
        python bench/bench_grader.py --public
Needs:  pip install -r bench/requirements.txt  (math-verify)
"""

import argparse
import ast
import glob
import json
import logging
import os
import random
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from rgra import answers_equal, extract_answer  # noqa: E402 (rgra is found through REPO, set above)

PUBLIC_CASES = os.path.join(REPO, "bench", "grader_cases.jsonl")


def gold_of(row):
    """The final answer (str or None) of a data row: the same fields rgra.gold_answer reads."""
    if "final_answer" in row:
        return row["final_answer"][0].strip().strip("$")
    answer = row.get("answer")
    if isinstance(answer, list):
        answer = answer[0].strip() if answer else None
    if isinstance(answer, float):
        # AMC floats stay as 27.0: the grader's job.
        return str(answer)
    if isinstance(answer, str) and "####" in answer:
        return answer.split("####")[-1].strip()
    if isinstance(answer, str) and answer.startswith("['"):
        return str(ast.literal_eval(answer)[0]).strip()
    if answer is not None:
        return str(answer)
    return extract_answer(row.get("solution", ""))


def equivalent(gold, rng):
    """The gold answer (str) in another notation, drawn with rng: 1,000 or 1000.0 for 1000."""
    if re.fullmatch(r"-?\d+", gold):
        number = int(gold)
        return rng.choice(
            [f"{number:,}", f"{number}.0", f"x = {number}", f"{number}\\text{{ units}}"]
        )
    if re.fullmatch(r"-?\d+\.\d+", gold):
        return rng.choice([gold + "0", f"{float(gold):.6g}", f"{float(gold):e}"])
    fraction = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", gold)
    if fraction:
        sign, numerator, denominator = fraction.groups()
        if len(numerator + denominator) == 2:
            dfrac = f"{sign}\\dfrac{numerator}{denominator}"
        else:
            dfrac = f"{sign}\\dfrac{{{numerator}}}{{{denominator}}}"
        return rng.choice([f"{sign}{numerator}/{denominator}", dfrac])
    # A list gets spaces after its commas (not thousands separators), anything else \left( \right).
    spaced = re.sub(r",(?!\\!|\d{3}\b)", ", ", gold) if "," in gold else f"\\left({gold}\\right)"
    return rng.choice(
        [spaced, gold.replace("\\frac", "\\dfrac"), f"${gold}$", gold.replace(" ", "")]
    )


def different(gold, rng):
    """A near miss of the gold answer (str): one of its numbers changed, or "+1" appended."""
    numbers = list(re.finditer(r"(?<![\d.])\d+", gold))
    if not numbers:
        return gold + "+1"
    number = rng.choice(numbers)
    changed = str(int(number.group()) + rng.choice([1, 2, 9]))
    return gold[: number.start()] + changed + gold[number.end() :]


def build_pairs(data_dir, n, seed):
    """n (pred, gold, expected) pairs from the golds of up to 400 rows of each data file: half
    equal in another notation, half near misses."""
    rng = random.Random(seed)
    golds = []
    for path in sorted(glob.glob(os.path.join(data_dir, "*", "*.jsonl"))):
        with open(path) as data_file:
            rows = [json.loads(line) for line in data_file]
        rng.shuffle(rows)
        golds += [gold for gold in (gold_of(row) for row in rows[:400]) if gold]
    rng.shuffle(golds)
    pairs = []
    for gold in golds[: n // 2]:
        pairs.append((equivalent(gold, rng), gold, True))
        pairs.append((different(gold, rng), gold, False))
    return pairs


def run_ours(pairs):
    """([equal] by rgra's answers_equal, seconds taken) for the pairs."""
    start = time.perf_counter()
    results = [answers_equal(pred, gold)[0] for pred, gold, _ in pairs]
    return results, time.perf_counter() - start


def run_math_verify(pairs):
    """([equal] by Math-Verify, each answer boxed, seconds taken) for the pairs."""
    from math_verify import parse, verify

    start = time.perf_counter()
    results = []
    for pred, gold, _ in pairs:
        results.append(bool(verify(parse("\\boxed{" + gold + "}"), parse("\\boxed{" + pred + "}"))))
    return results, time.perf_counter() - start


def boxed(s):
    """s in \\boxed{} unless it has its own $, \\boxed, \\( or \\[ (for Math-Verify's parser)."""
    if re.search(r"\$|\\boxed|\\\(|\\\[", s):
        return s
    return "\\boxed{" + s + "}"


def math_verify_equal(pred, gold, box):
    """Math-Verify's verdict on pred against gold (answers boxed if box); False if it raises."""
    from math_verify import parse, verify

    if box:
        pred = boxed(pred)
        gold = boxed(gold)
    try:
        return bool(verify(parse(gold), parse(pred)))
    except Exception:  # noqa: BLE001 (a grader that raises answers False, as in a reward function)
        return False


# The graders that --public scores, each run alone in a fresh process (no cache warmed by another).
PUBLIC_GRADERS = {
    "rgra answers_equal": "rgra",
    "Math-Verify, raw strings": "raw",
    "Math-Verify, bare answers boxed": "boxed",
}


def score_public(grader):
    """Print "agreeing cases, cases, seconds" of one grader ("rgra", "raw" or "boxed" Math-Verify)
    over the public cases: one pass, after one warm-up call (rgra's worker started)."""
    with open(PUBLIC_CASES) as cases_file:
        cases = [json.loads(line) for line in cases_file]
    if grader == "rgra":
        answers_equal("x+1", "1+x")
        start = time.perf_counter()
        verdicts = [answers_equal(case["pred"], case["gold"])[0] for case in cases]
    else:
        # Math-Verify logs every parse failure.
        logging.disable(logging.WARNING)
        math_verify_equal("x+1", "1+x", grader == "boxed")
        start = time.perf_counter()
        verdicts = [math_verify_equal(c["pred"], c["gold"], grader == "boxed") for c in cases]
    seconds = time.perf_counter() - start
    agree = sum(verdict == case["expected"] for verdict, case in zip(verdicts, cases, strict=True))
    print(agree, len(cases), seconds)


def run_public():
    """Print how many public grader cases rgra (and Math-Verify, if installed) agree with, and
    the seconds each takes over all of them, each grader alone in a fresh process."""
    try:
        import math_verify  # noqa: F401 (only to know whether it is installed)
    except ImportError:
        print("Math-Verify is not installed (pip install -r bench/requirements.txt): skipped")
    our_seconds = None
    for name, grader in PUBLIC_GRADERS.items():
        if grader != "rgra" and "math_verify" not in sys.modules:
            break
        command = [sys.executable, os.path.abspath(__file__), "--score-public", grader]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        agree, cases, seconds = out.stdout.split()[-3:]
        seconds = float(seconds)
        ratio = f" ({seconds / our_seconds:.1f}x rgra's time)" if our_seconds else ""
        our_seconds = our_seconds or seconds
        print(f"{name:34}: {agree}/{cases} agree with the sources, {seconds:.2f} s{ratio}")


def main():
    """Parse the command line; score the public cases, or compare the two graders on built pairs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(os.path.dirname(REPO), "shared", "data"))
    parser.add_argument("--n", type=int, default=2000, help="number of (pred, gold) pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--public", action="store_true", help="score bench/grader_cases.jsonl")
    parser.add_argument("--score-public", choices=PUBLIC_GRADERS.values(), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score_public:
        score_public(args.score_public)
        return
    if args.public:
        run_public()
        return
    pairs = build_pairs(args.data, args.n, args.seed)
    # Start the sympy worker outside the timing.
    answers_equal("x+1", "1+x")
    ours, our_seconds = run_ours(pairs)
    theirs, their_seconds = run_math_verify(pairs)
    n = len(pairs)
    expected = [equal for _, _, equal in pairs]
    our_matches = sum(a == b for a, b in zip(ours, expected, strict=True)) / n
    their_matches = sum(a == b for a, b in zip(theirs, expected, strict=True)) / n
    agreement = sum(a == b for a, b in zip(ours, theirs, strict=True)) / n
    print(f"pairs: {n} ({sum(expected)} built equal, the rest near misses)")
    print(f"rgra       : {n / our_seconds:9.1f} pairs/s, matches construction {our_matches:.2%}")
    print(
        f"Math-Verify: {n / their_seconds:9.1f} pairs/s, matches construction {their_matches:.2%}"
    )
    print(f"speed ratio: {their_seconds / our_seconds:9.1f}x")
    print(f"agreement  : {agreement:.2%}")


if __name__ == "__main__":
    main()
