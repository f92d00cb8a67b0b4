"""Checks over every row of the full benchmark and training files (the shared/data folder beside the
repository): what test_rgra.py checks on small files built in code, here on the real ones.

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

Usage:  python bench/check_golds.py [--data DIR]     (default: ../shared/data beside the repository)
Prints counts; exits 1 when a check fails (each failure listed), 2 when the folder is missing.
"""

import argparse
import ast
import glob
import os
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
    for name in BENCHMARKS:
        check_benchmark(name, data, failures)
    print(f"{len(failures)} failures ({time.time() - start:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
