"""Writes the bundled fine-tuning task of examples/train_gemma.py: ISO dates -> dates in words.

    {"prompt": "Date 1987-02-10 in words:", "completion": " the 10th of February, 1987"}

A deterministic task with one right answer per prompt, so held-out exact match measures it. The
base Gemma 3 270M knows month names and ordinals but not this format (it rambles or echoes the
date); a few minutes of LoRA teach it. Run `python examples/data/make_data.py` to regenerate the
files; the output is the same on every machine (a fixed seed, no clock).
"""

import datetime
import json
import os
import random

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
HERE = os.path.dirname(os.path.abspath(__file__))


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def record(date: datetime.date) -> dict:
    return {
        "prompt": f"Date {date.isoformat()} in words:",
        "completion": f" the {ordinal(date.day)} of {MONTHS[date.month - 1]}, {date.year}",
    }


def main(n_train: int = 480, n_eval: int = 60, seed: int = 0) -> None:
    rng = random.Random(seed)
    first, span = datetime.date(1900, 1, 1), (datetime.date(2099, 12, 31) - datetime.date(1900, 1, 1)).days
    days = rng.sample(range(span + 1), n_train + n_eval)  # distinct dates: no eval date is trained on
    dates = [first + datetime.timedelta(days=d) for d in days]
    for name, part in (("dates_train.jsonl", dates[:n_train]), ("dates_eval.jsonl", dates[n_train:])):
        path = os.path.join(HERE, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for date in part:
                f.write(json.dumps(record(date)) + "\n")
        os.replace(path + ".tmp", path)
        print(f"wrote {len(part)} records to {path}")


if __name__ == "__main__":
    main()
