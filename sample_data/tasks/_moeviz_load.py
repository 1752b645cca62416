"""Loads a moeviz bundled task file (lm-eval `custom_dataset`): the JSONL beside this file, so the task
works from any working directory and reads nothing else. Written by moeviz.evaluation.bundled_tasks."""

import json
from pathlib import Path


def load(file, **_metadata):
    import datasets

    rows = [json.loads(line) for line in (Path(__file__).parent / file).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
