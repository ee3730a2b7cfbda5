"""A small task for a real instruction-tuned model: add two numbers below ten, answering with
the number only.

``python -m fastrlhf.pipeline.examples.arithmetic DIR`` writes the data of every stage:

* ``DIR/sft.jsonl``: demonstrations (the right answer) of 80 of the 100 questions;
* ``DIR/preferences.jsonl``: for each of them the right answer against a wrong number, and
  against the right number in a sentence;
* ``DIR/prompts.jsonl``: the 80 questions; ``DIR/eval.jsonl``: the 20 held out.

``--reward-fn fastrlhf.pipeline.examples.arithmetic:reward`` scores a completion 1 when it is
exactly the right number, 0.5 when the first number in it is right, else 0.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import sys

QUESTION = "What is {a} + {b}? Answer with the number only."


def _write(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def make(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Write the task's JSONL files into ``out_dir``; returns their paths by name."""
    rng = random.Random(seed)
    pairs = list(itertools.product(range(10), repeat=2))
    rng.shuffle(pairs)
    train, held_out = pairs[:80], pairs[80:]
    sft, prefs = [], []
    for i, (a, b) in enumerate(train):
        question, answer = QUESTION.format(a=a, b=b), str(a + b)
        sft.append({"prompt": question, "completion": answer})
        wrong = str(a + b + rng.choice([d for d in (-2, -1, 1, 2) if a + b + d >= 0]))
        prefs.append({"prompt": question, "chosen": answer, "rejected": wrong})
        prefs.append({"prompt": question, "chosen": answer, "rejected": f"The sum of {a} and {b} is {answer}."})
    os.makedirs(out_dir, exist_ok=True)
    files = {name: os.path.join(out_dir, f"{name}.jsonl") for name in ("sft", "preferences", "prompts", "eval")}
    _write(files["sft"], sft)
    _write(files["preferences"], prefs)
    _write(files["prompts"], [{"prompt": QUESTION.format(a=a, b=b)} for a, b in train])
    _write(files["eval"], [{"prompt": QUESTION.format(a=a, b=b)} for a, b in held_out])
    return files


def reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1 for exactly the right number, 0.5 when the completion's first number is right, else 0."""
    scores = []
    for prompt, completion in zip(prompts, completions):
        a, b = (int(x) for x in re.findall(r"\d+", prompt)[:2])
        numbers = re.findall(r"-?\d+", completion)
        if completion.strip() == str(a + b):
            scores.append(1.0)
        else:
            scores.append(0.5 if numbers and int(numbers[0]) == a + b else 0.0)
    return scores


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m fastrlhf.pipeline.examples.arithmetic DIR")
    for name, path in make(sys.argv[1]).items():
        print(f"{name}: {path}")
