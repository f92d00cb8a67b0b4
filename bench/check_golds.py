r"""Checks over every row of the full benchmark and training files (the shared/data folder beside
the repository): what test_rgra.py checks on small files built in code, here on the real ones.

  1. rows and golds: every row of every *.jsonl file has a question and, but for the known rows
     without any, a gold answer: rgra.gold_answer for the training files (what rgra.py trains on),
     eval.benchmark_gold for the others (what eval.py scores against); on training files the two
     agree (as strings, or as answers: MATH's '097' and eval's '97'). Each gold also agrees with an
     independent reading of the fields (written here from data/SOURCES.md).
  2. reformatted golds: every distinct gold is extracted back from a completion that boxes it, and
     the grader finds it equal to itself and to itself in $...$; the raw stored form (AMC's 27.0,
     AIME's '025') equals the clean gold.
  3. eval.load_benchmark: the six benchmarks load from --data with their published sizes and
     known first golds.
  4. golds as models write them: every distinct gold rewritten (spaces in and after commands,
     \dfrac, \left( \right), Unicode, thousands separators, \$, \displaystyle, a set) is equal to
     it, and so is the answer of completions around it (answer phrases followed by words, an
     earlier box, \( \), a period or a unit in the box, "and" between boxes); the same built from a
     near miss (its first number plus one) is not.

Usage:  python bench/check_golds.py [--data DIR]     (default: ../shared/data beside the repository)
Prints counts; exits 1 when a check fails (each failure listed), 2 when the folder is missing.
"""

import argparse
import ast
import collections
import glob
import os
import re
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import eval as rgra_eval  # noqa: E402 (found through REPO, set above)
import rgra  # noqa: E402 (found through REPO, set above)

TRAINING_FILES = {"gsm8k/train.jsonl", "math/train.jsonl", "math_lvl3to5/train.derived.jsonl"}
# The only rows without a gold: two MATH train solutions that box nothing ("there are $\boxed{}$
# primes in that range"), which the derived level 3-5 set also holds.
NO_GOLD = {
    "math/train.jsonl:5530",
    "math/train.jsonl:5532",
    "math_lvl3to5/train.derived.jsonl:4297",
    "math_lvl3to5/train.derived.jsonl:4299",
}
FILES = 15
ROWS = 33257
# Each benchmark's number of problems and first golds.
BENCHMARKS = {
    "gsm8k": (1319, ["18"]),
    "math500": (500, [r"\left( 3, \frac{\pi}{2} \right)", "p - q"]),
    "aime24": (30, ["204"]),
    "amc23": (40, ["27"]),
    "minerva_math": (272, []),
    "olympiadbench": (675, []),
}


class Failures(list):
    """The failure messages of the checks; the first 50 are printed as they come."""

    def add(self, message):
        """Record a failure message, and print it if it is among the first 50."""
        self.append(message)
        if len(self) <= 50:
            print("FAIL", message)


def spec_gold(row):
    """The gold (str or None) as data/SOURCES.md describes each file's fields, independently of
    rgra and eval."""
    if "final_answer" in row:
        return row["final_answer"][0].strip().strip("$").strip()
    answer = row.get("answer")
    if isinstance(answer, list):
        return answer[0].strip()
    if isinstance(answer, float):
        return str(int(answer)) if answer.is_integer() else str(answer)
    if isinstance(answer, str) and "####" in answer:
        return answer.split("####")[-1].strip().replace(",", "")
    if isinstance(answer, str) and answer.startswith(("['", '["')):
        return str(ast.literal_eval(answer)[0]).strip()
    if isinstance(answer, (int, str)) and str(answer).strip():
        return str(answer).strip()
    return rgra.extract_answer(row.get("solution") or "")


def check_row(where, row, training, failures):
    """(gold: str or None, whether the fields write it otherwise) of one row, after checking its
    question and gold (check 1)."""
    if rgra.question_text(row) is None:
        failures.add(f"{where}: no question")
    bench = rgra_eval.benchmark_gold(row)
    gold = rgra.gold_answer(row) if training else bench
    same = gold == bench or (gold and bench and rgra.answers_equal(gold, bench)[0])
    if training and not same:
        failures.add(f"{where}: rgra.gold_answer {gold!r}, but eval.benchmark_gold {bench!r}")
    if gold is None:
        return None, False
    if not gold.strip() or gold != gold.strip():
        failures.add(f"{where}: gold {gold!r} is empty or not stripped")
    spec = spec_gold(row)
    if spec != gold and not rgra.answers_equal(gold, spec or "")[0]:
        failures.add(f"{where}: gold {gold!r}, but the fields say {spec!r}")
    return gold, spec != gold


def check_rows(data, failures):
    """Check 1 over every row of every file in data: {(file, gold): a row with that gold}."""
    paths = glob.glob(os.path.join(data, "**", "*.jsonl"), recursive=True)
    files = sorted(os.path.relpath(path, data) for path in paths)
    rows = 0
    no_gold = set()
    golds = {}
    written_otherwise = 0
    for rel in files:
        for where, row in rgra.read_rows(os.path.join(data, rel), hub={}):
            where = f"{rel}:{where.rsplit(':', 1)[1]}"
            rows += 1
            gold, otherwise = check_row(where, row, rel in TRAINING_FILES, failures)
            written_otherwise += otherwise
            if gold is None:
                no_gold.add(where)
            else:
                golds.setdefault((rel, gold), row)
    print(
        f"rows: {rows} in {len(files)} files; golds: {rows - len(no_gold)} ({len(golds)} distinct "
        f"per file), rows without a gold: {len(no_gold)}; golds written otherwise than the "
        f"fields but equal: {written_otherwise}"
    )
    if (len(files), rows) != (FILES, ROWS):
        failures.add(f"{len(files)} files and {rows} rows, want {FILES} and {ROWS}")
    if no_gold != NO_GOLD:
        failures.add(f"rows without a gold: {sorted(no_gold)}, want {sorted(NO_GOLD)}")
    return golds


def check_reformatted(golds, failures):
    """Check 2: each distinct gold boxed, $-wrapped and as stored in its row."""
    for (rel, gold), row in golds.items():
        completion = f"Putting it together, the answer is $\\boxed{{{gold}}}$."
        extracted = rgra.extract_answer(completion)
        if extracted != gold:
            failures.add(f"{rel}: gold {gold!r} boxed is extracted as {extracted!r}")
        for written in (gold, f"${gold}$"):
            result = rgra.answers_equal(written, gold)
            if result != (True, "ok"):
                failures.add(f"{rel}: {written!r} against gold {gold!r}: {result}")
        raw = row.get("answer")
        # AMC's floats (27.0) and AIME's zero padding ('025') as stored.
        padded = isinstance(raw, str) and raw.strip().startswith("0") and raw.strip().isdigit()
        if isinstance(raw, float) or padded:
            raw = str(raw).strip()
            if not (rgra.answers_equal(raw, gold)[0] and rgra.answers_equal(gold, raw)[0]):
                failures.add(f"{rel}: the stored {raw!r} and the gold {gold!r} differ")
    print(f"reformatted golds: {len(golds)} distinct golds boxed, $-wrapped and raw")
    if len(golds) < 10_000:
        failures.add(f"only {len(golds)} distinct golds checked")


def check_benchmark(name, data, failures):
    """Check 3 for one benchmark: its size, first golds, no empty or $-wrapped gold, --limit."""
    size, first = BENCHMARKS[name]
    try:
        problems = rgra_eval.load_benchmark(name, data)
    except rgra.DataError as error:
        failures.add(f"eval.load_benchmark({name!r}): {error}")
        return
    if len(problems) != size:
        failures.add(f"{name}: {len(problems)} problems, want {size}")
    first_golds = [problem["answer"] for problem in problems[: len(first)]]
    if first_golds != first:
        failures.add(f"{name}: first golds {first_golds}, want {first}")
    if not all(problem["question"].strip() and problem["answer"].strip() for problem in problems):
        failures.add(f"{name}: an empty question or gold")
    if name == "olympiadbench" and any(problem["answer"].startswith("$") for problem in problems):
        failures.add(f"{name}: a gold still wrapped in $")
    if len(rgra_eval.load_benchmark(name, data, limit=7)) != 7:
        failures.add(f"{name}: --limit 7 does not give 7 problems")
    print(f"eval.load_benchmark({name!r}): {len(problems)} problems")


# LaTeX and the Unicode character a model may write instead.
UNICODE = [
    (r"\\pi(?![A-Za-z])", "π"),
    (r"\\leq?(?![A-Za-z])", "≤"),
    (r"\\geq?(?![A-Za-z])", "≥"),
    (r"\\neq?(?![A-Za-z])", "≠"),
    (r"\\times(?![A-Za-z])", "×"),
    (r"\\cdot(?![A-Za-z])", "·"),
    (r"\\infty(?![A-Za-z])", "∞"),
    (r"(?<![\\\w])-", "−"),
    (r"\\sqrt\{([^{}]*)\}", r"√(\1)"),
    (r"\\sqrt(\d)", r"√\1"),
]


def rewritten(gold):
    """[(kind, text)]: the gold as models also write it, each equal to it."""
    unicode = gold
    for latex, character in UNICODE:
        unicode = re.sub(latex, character, unicode)
    variants = [
        ("spaces after commands", re.sub(r"(\\[A-Za-z]+)(?=[{_^\[])", r"\1 ", gold)),
        ("spaces in braces", re.sub(r"(?<!\\)\}", " }", re.sub(r"(?<!\\)\{", "{ ", gold))),
        ("\\dfrac", gold.replace("\\frac", "\\dfrac")),
        ("\\left( \\right)", gold.replace("(", "\\left(").replace(")", "\\right)")),
        ("Unicode", unicode),
        ("\\displaystyle", "\\displaystyle " + gold),
    ]
    if re.fullmatch(r"\d{4,}", gold):
        variants.append(("thousands \\,", re.sub(r"(?<=\d)(?=(?:\d{3})+$)", r"\\,", gold)))
        variants.append(("thousands ,", f"{int(gold):,}"))
    if re.fullmatch(r"-?\d+(?:\.\d+)?", gold):
        variants.append(("\\$", "\\$" + gold))
    if "," in gold and not re.search(r"[()\[\]{}]", gold):
        variants.append(("set", "\\{" + gold + "\\}"))
    return [(kind, text) for kind, text in variants if text != gold]


def completions(gold):
    """[(kind, text)]: completions whose final answer is the gold."""
    texts = [
        ("phrase, then words", f"The answer is ${gold}$ since this satisfies every condition."),
        ("final phrase, then words", f"The final answer is ${gold}$ in total."),
        ("phrase, then a sentence", f"The answer is ${gold}$. This is 3 more than the guess."),
        (
            "an earlier box",
            f"First $\\boxed{{7}}$ for part one.\n\nSo the answer is $\\boxed{{{gold}}}$.",
        ),
        (
            "box, then words",
            f"Therefore the answer is $\\boxed{{{gold}}}$, which is what we wanted.",
        ),
        ("markdown", f"**Final Answer:** $\\boxed{{{gold}}}$"),
        ("\\( \\), then words", f"So the answer is \\( {gold} \\), as computed above."),
        ("period in the box", f"Thus $\\boxed{{{gold}.}}$"),
    ]
    if re.fullmatch(r"-?[\d,.]+", gold):
        texts.append(("unit in the box", f"So the answer is $\\boxed{{{gold} \\text{{ cm}}}}$."))
        texts.append(("phrase, then a unit", f"The answer is {gold} dollars."))
    # Several answers, one box each ("1, 2" but not the digit groups of 15,600).
    if "," in gold and not re.search(r"[()\[\]{}]|\d,\s*(?:\\!)?\s*\d{3}", gold):
        boxes = " and ".join(f"$\\boxed{{{part.strip()}}}$" for part in gold.split(","))
        texts.append(("boxes joined by and", f"The solutions are {boxes}."))
    return texts


def written_cases(gold):
    """[(kind, text, expected, verdict)] of check 4 for one gold: verdict(text, gold)[0] must be
    expected (answers_equal for a rewritten gold, grade for a completion)."""
    cases = [(kind, text, True, rgra.answers_equal) for kind, text in rewritten(gold)]
    cases += [(kind, text, True, rgra.grade) for kind, text in completions(gold)]
    number = re.search(r"(?<![\d.])\d+", gold)
    if number:
        near = gold[: number.start()] + str(int(number[0]) + 1) + gold[number.end() :]
        for kind, text in [("as it is", near)] + rewritten(near):
            cases.append((f"near miss, {kind}", text, False, rgra.answers_equal))
        for kind, text in completions(near):
            cases.append((f"near miss, {kind}", text, False, rgra.grade))
    return cases


def check_written(golds, failures):
    """Check 4: each distinct gold rewritten and in completions is equal to itself; the same
    built from a near miss (the gold's first number plus one) is not."""
    checked = collections.Counter()
    missed = collections.Counter()
    distinct = sorted({gold for _, gold in golds})
    # Rewritten without its $..$ (the Dr. GRPO files); an answer phrase ends at the line's end
    # and a $ ends a math span, so a gold with a newline or a $ inside (OlympiadBench's prose) is
    # only boxed (check 2).
    bare = {gold: re.sub(r"^\$(.*)\$$", r"\1", gold) for gold in distinct}
    written = [gold for gold in distinct if not re.search(r"\n|(?<!\\)\$", bare[gold])]
    for gold in written:
        for kind, text, expected, verdict in written_cases(bare[gold]):
            checked[kind] += 1
            if verdict(text, gold)[0] is not expected:
                missed[kind] += 1
                failures.add(f"{kind}: {text!r} against gold {gold!r}: {verdict(text, gold)}")
    for kind in checked:
        print(f"  {kind:45}: {checked[kind] - missed[kind]}/{checked[kind]} as expected")
    print(
        f"golds as models write them: {len(written)} of {len(distinct)} distinct golds, "
        f"{sum(checked.values())} variants and completions checked"
    )


def main(argv=None):
    """Run the three checks on --data; the exit status: 0, 1 on a failure, 2 without the folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = os.path.join(REPO, "..", "shared", "data")
    parser.add_argument("--data", default=default, help="folder of the *.jsonl files")
    args = parser.parse_args(argv)
    data = os.path.abspath(args.data)
    if not os.path.isdir(data):
        print(f"error: --data {data}: no such folder", file=sys.stderr)
        return 2
    failures = Failures()
    start = time.time()
    golds = check_rows(data, failures)
    check_reformatted(golds, failures)
    check_written(golds, failures)
    for name in BENCHMARKS:
        check_benchmark(name, data, failures)
    print(f"{len(failures)} failures ({time.time() - start:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
