"""The examples a run holds out for evaluation, written where a user finds them.

The trainer evaluates on the last ``data.num_eval_examples`` examples of the dataset. It writes
their ids, and the rows themselves when the file the dataset was preprocessed from is still there
(``PREFIX.meta.json``'s ``source``: pairs.jsonl, which carries the triplet fields), next to its
metrics: ``heldout.jsonl`` is the ``--input`` of ``examples/evaluate_qa.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

#: The fields evaluate_qa reads from a held-out row (``evaluation/items.py``'s TRIPLET_FIELDS).
ROW_FIELDS = ("id", "question", "answers", "prompt_short", "prompt_long")


def heldout_ids(meta: dict, num_eval_examples: int) -> list:
    """Ids of the held-out examples, in dataset order."""
    ids = meta.get("example_ids") or []
    return ids[len(ids) - num_eval_examples:] if num_eval_examples else []


def heldout_rows(rows_path: str, ids: list) -> list[dict]:
    """The rows of ``rows_path`` (JSONL with an ``id`` per row) for ``ids``, in their order;
    ValueError naming the missing ids when the file is not the one the dataset was built from."""
    wanted, found = set(ids), {}
    with open(rows_path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("id") in wanted:
                found[row["id"]] = row
    missing = [i for i in ids if i not in found]
    if missing:
        raise ValueError(f"{rows_path}: held-out example ids missing ({missing[:3]}...); was "
                         f"the dataset built from it?")
    return [found[i] for i in ids]


def write_heldout(dataset_prefix: str, meta: dict, num_eval_examples: int,
                  folder: str) -> Optional[Path]:
    """Write ``folder/heldout_ids.json`` (ids, dataset, count) and, when the preprocess input is
    still there with these ids, ``folder/heldout.jsonl`` (its rows, ready for evaluate_qa).
    Returns the path of what evaluate_qa can read, or None when only the ids could be written."""
    ids = heldout_ids(meta, num_eval_examples)
    if not ids:
        return None
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    source = meta.get("source")
    rows_note = None
    rows_path = out / "heldout.jsonl"
    if source and os.path.isfile(source):
        try:
            rows = heldout_rows(source, ids)
        except (ValueError, OSError) as exc:
            rows, rows_note = None, str(exc)
    else:
        rows, rows_note = None, f"{source} (the preprocess input) is not there"
    if rows is not None:
        tmp = rows_path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({k: row[k] for k in ROW_FIELDS if k in row}) + "\n")
        os.replace(tmp, rows_path)
    (out / "heldout_ids.json").write_text(json.dumps({
        "dataset": dataset_prefix, "num_eval_examples": num_eval_examples, "ids": ids,
        "rows": str(rows_path) if rows is not None else None, "rows_note": rows_note},
        indent=2) + "\n")
    return rows_path if rows is not None else None
