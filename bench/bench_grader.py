"""Throughput and agreement of rgra's answers_equal against Math-Verify on the same pairs.

Pairs are built from the gold answers of the files in shared/data: each gold is paired
with itself re-written in an equivalent notation and with a near-miss that is not equal.
With --public, instead: agreement of rgra's grader and of Math-Verify with the public grader cases of
test_rgra.py (PUBLIC: the expected values their sources assert).
Usage:  python bench/bench_grader.py [--data DIR] [--n N] [--seed S]
        python bench/bench_grader.py --public
Needs:  pip install -r bench/requirements.txt  (math-verify)
"""
import argparse
import ast
import glob
import json
import os
import random
import re
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scratch: grader.py sits here
from rgra import answers_equal, extract_answer  # noqa: E402


def gold_of(row):
    """Final answer of a data row (the same fields rgra.gold_answer reads)."""
    if "final_answer" in row:
        return row["final_answer"][0].strip().strip("$")
    ans = row.get("answer")
    if isinstance(ans, list):
        ans = ans[0].strip() if ans else None
    if isinstance(ans, float):
        return str(ans)                       # AMC floats stay as 27.0: the grader's job
    if isinstance(ans, str) and "####" in ans:
        return ans.split("####")[-1].strip()
    if isinstance(ans, str) and ans.startswith("['"):
        return str(ast.literal_eval(ans)[0]).strip()
    if ans is not None:
        return str(ans)
    return extract_answer(row.get("solution", ""))


def equivalent(g, rng):
    """The same answer in another notation."""
    if re.fullmatch(r"-?\d+", g):
        return rng.choice([f"{int(g):,}", f"{int(g)}.0", f"x = {int(g)}", f"{int(g)}\\text{{ units}}"])
    if re.fullmatch(r"-?\d+\.\d+", g):
        return rng.choice([g + "0", f"{float(g):.6g}", f"{float(g):e}"])
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", g)
    if m:
        return rng.choice([f"{m[1]}{m[2]}/{m[3]}", f"{m[1]}\\dfrac{m[2]}{m[3]}" if len(m[2] + m[3]) == 2
                           else f"{m[1]}\\dfrac{{{m[2]}}}{{{m[3]}}}"])
    return rng.choice([f"\\left({g}\\right)" if "," not in g else re.sub(r",(?!\\!|\d{3}\b)", ", ", g),
                       g.replace("\\frac", "\\dfrac"), f"${g}$", g.replace(" ", "")])


def different(g, rng):
    """A near miss: one number changed."""
    nums = list(re.finditer(r"(?<![\d.])\d+", g))
    if not nums:
        return g + "+1"
    m = rng.choice(nums)
    return g[:m.start()] + str(int(m.group()) + rng.choice([1, 2, 9])) + g[m.end():]


def build_pairs(data_dir, n, seed):
    rng = random.Random(seed)
    golds = []
    for path in sorted(glob.glob(os.path.join(data_dir, "*", "*.jsonl"))):
        rows = [json.loads(line) for line in open(path)]
        rng.shuffle(rows)
        golds += [g for g in (gold_of(r) for r in rows[:400]) if g]
    rng.shuffle(golds)
    pairs = []
    for g in golds[:n // 2]:
        pairs.append((equivalent(g, rng), g, True))
        pairs.append((different(g, rng), g, False))
    return pairs


def run_ours(pairs):
    t = time.perf_counter()
    out = [answers_equal(p, g)[0] for p, g, _ in pairs]
    return out, time.perf_counter() - t


def run_math_verify(pairs):
    from math_verify import parse, verify
    t = time.perf_counter()
    out = [bool(verify(parse("\\boxed{" + g + "}"), parse("\\boxed{" + p + "}"))) for p, g, _ in pairs]
    return out, time.perf_counter() - t


def run_public():
    import logging
    from math_verify import parse, verify
    from test_rgra import PUBLIC
    logging.disable(logging.WARNING)  # Math-Verify logs every parse failure
    boxed = lambda s: s if re.search(r"\$|\\boxed|\\\(|\\\[", s) else "\\boxed{" + s + "}"  # noqa: E731

    def safe(fn):  # a grader that raises answers False
        try:
            return bool(fn())
        except Exception:
            return False
    graders = {"rgra answers_equal": lambda p, g: answers_equal(p, g)[0],
               "Math-Verify, raw strings": lambda p, g: verify(parse(g), parse(p)),
               "Math-Verify, bare answers boxed": lambda p, g: verify(parse(boxed(g)), parse(boxed(p)))}
    for name, fn in graders.items():
        agree = sum(safe(lambda: fn(p, g)) == e for p, g, e in PUBLIC)
        print(f"{name:34}: {agree}/{len(PUBLIC)} agree with the sources ({agree / len(PUBLIC):.1%})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(os.path.dirname(REPO), "shared", "data"))
    ap.add_argument("--n", type=int, default=2000, help="number of (pred, gold) pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--public", action="store_true", help="score the public grader cases of test_rgra.py")
    args = ap.parse_args()
    if args.public:
        return run_public()
    pairs = build_pairs(args.data, args.n, args.seed)
    answers_equal("x+1", "1+x")   # start the sympy worker outside the timing
    ours, t_ours = run_ours(pairs)
    mv, t_mv = run_math_verify(pairs)
    n = len(pairs)
    print(f"pairs: {n} ({sum(e for *_, e in pairs)} built equal, the rest near misses)")
    print(f"rgra answers_equal: {n / t_ours:9.1f} pairs/s   matches construction {sum(o == e for o, (*_, e) in zip(ours, pairs)) / n:.2%}")
    print(f"Math-Verify     : {n / t_mv:9.1f} pairs/s   matches construction {sum(o == e for o, (*_, e) in zip(mv, pairs)) / n:.2%}")
    print(f"speed ratio     : {t_mv / t_ours:9.1f}x")
    print(f"agreement       : {sum(a == b for a, b in zip(ours, mv)) / n:.2%}")


if __name__ == "__main__":
    main()
