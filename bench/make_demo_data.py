"""
bench/make_demo_data.py: the CPU demo task, single-digit additions and multiplications asked in
four phrasings each ("What is 3 + 5?", "What is the product of 4 and 7?", ...).

  python bench/make_demo_data.py                    # writes bench/demo/train.jsonl and test.jsonl

The split is by arithmetic fact: a test question's operation and operands (in either order) never
appear in any training question, whatever the phrasing. Deterministic for a given --seed.
"""

import argparse
import json
import os
import random

PHRASINGS = {
    "+": [
        "What is {a} + {b}?",
        "What is {a} plus {b}?",
        "Compute {a} + {b}.",
        "What is the sum of {a} and {b}?",
    ],
    "*": [
        "What is {a} * {b}?",
        "What is {a} times {b}?",
        "Compute {a} * {b}.",
        "What is the product of {a} and {b}?",
    ],
}


def questions(op, a, b):
    """Every phrasing of a op b and of b op a (op is "+" or "*"), as problems
    [{"question": str, "answer": str}] with the same gold answer."""
    answer = str(a + b if op == "+" else a * b)
    pairs = {(a, b), (b, a)}
    return [
        {"question": phrasing.format(a=x, b=y), "answer": answer}
        for x, y in sorted(pairs)
        for phrasing in PHRASINGS[op]
    ]


def main():
    """Write the train and test files of the demo task to --out."""
    parser = argparse.ArgumentParser(description="Write the demo task's train.jsonl and test.jsonl")
    parser.add_argument("--out", default=os.path.join("bench", "demo"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-size", type=int, default=200)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    # Every unordered fact: 2 operations x 55 pairs a <= b.
    facts = [(op, a, b) for op in PHRASINGS for a in range(10) for b in range(a, 10)]
    rng.shuffle(facts)
    test = []
    train = []
    # Whole facts go to test until it is full, the rest to train.
    for fact in facts:
        if len(test) < args.test_size:
            test.extend(questions(*fact))
        else:
            train.extend(questions(*fact))
    # The cut fact's remaining questions are dropped, not trained on.
    test = test[: args.test_size]
    rng.shuffle(train)
    rng.shuffle(test)
    os.makedirs(args.out, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        path = os.path.join(args.out, f"{name}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{path}: {len(rows)} problems")


if __name__ == "__main__":
    main()
