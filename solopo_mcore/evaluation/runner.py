"""Resumable evaluation runs: items -> greedy generations -> ``results.jsonl`` -> summaries.

Layout of ``output_dir``::

    <name>/settings.json    what produced the results (a resumed run must match it)
    <name>/results.jsonl    one line per generation, appended batch by batch
    <name>/summary.json|md  metrics with 95 % bootstrap intervals; heatmap.png for grids
    summary.json|md         every checkpoint in the folder evaluated on the same data settings
                            (this run's and earlier runs'); comparison.png: short vs long bars

A rerun skips the ids already in ``results.jsonl`` (an interrupted last line is cut off and
generated again); a folder written with other settings is refused, naming the difference.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from tqdm import tqdm

from data_tools.common import write_json
from solopo_mcore.evaluation import items as items_mod
from solopo_mcore.evaluation import models, plots, summary as summary_mod
from solopo_mcore.evaluation.items import EvalInputError, EvalItem
from solopo_mcore.errors import UserError
from solopo_mcore.log import log

RESULTS_FILE = "results.jsonl"
SETTINGS_FILE = "settings.json"


@dataclass
class EvalConfig:
    input_path: str
    """Held-out rows from ``data_tools.build_triplets`` (JSONL)."""
    output_dir: str
    """Folder for results, summaries and figures (one subfolder per checkpoint)."""
    models: list = field(default_factory=list)
    """``[(name, path)]``: HF checkpoint dirs or Megatron checkpoint dirs."""
    mode: str = "triplets"
    """``triplets`` (each row's short and long prompt) or ``grid`` (NIAH-style depth x length)."""
    lengths_tokens: list = field(default_factory=lambda: [4096, 8192, 16384, 32768])
    """Grid: total user-message lengths in tokens."""
    depths_percent: list = field(default_factory=lambda: [0, 25, 50, 75, 100])
    """Grid: evidence depths, percent of the distractor text before the evidence."""
    distractor_pool: str = "builtin:wiki"
    """Grid: distractor source, as in ``data_tools.build_triplets``."""
    tokenizer: Optional[str] = None
    """Grid: tokenizer that measures lengths (None: the first HF checkpoint's, else
    ``builtin:qwen2.5``)."""
    backend: str = "auto"
    """``auto`` (vLLM when installed, else transformers), ``hf`` or ``vllm``."""
    batch_size: int = 8
    """Prompts per generate call."""
    max_new_tokens: int = 512
    """Generation budget per answer (the prompt asks for step-by-step reasoning)."""
    limit: Optional[int] = None
    """Evaluate only the first N examples (a quick look; a later full run resumes)."""
    seed: int = 0
    """Distractor choice (grid) and bootstrap resampling."""
    num_bootstrap: int = summary_mod.NUM_BOOTSTRAP
    """Bootstrap resamples for the 95 % intervals."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_settings(cfg: EvalConfig, model_path: str, backend: str) -> dict:
    """What must match for results to be reused (not ``limit`` / ``batch_size``)."""
    settings = {"input_sha256": _sha256(cfg.input_path), "mode": cfg.mode,
                "model": models.checkpoint_identity(model_path), "backend": backend,
                "max_new_tokens": cfg.max_new_tokens}
    if cfg.mode == "grid":
        settings.update(lengths_tokens=list(cfg.lengths_tokens),
                        depths_percent=[float(d) for d in cfg.depths_percent],
                        distractor_pool=cfg.distractor_pool, tokenizer=cfg.tokenizer,
                        seed=cfg.seed)
    return settings


def check_settings(folder: Path, settings: dict) -> None:
    """Record the settings of a new folder; refuse one written with other settings."""
    path = folder / SETTINGS_FILE
    if not path.is_file():
        if (folder / RESULTS_FILE).exists():
            raise EvalInputError(f"{folder / RESULTS_FILE} exists without {SETTINGS_FILE}; "
                                 f"it was not written by this tool. Use another --output folder")
        folder.mkdir(parents=True, exist_ok=True)
        write_json(str(path), settings)
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    diffs = [f"{key}: {json.dumps(old.get(key))} there, {json.dumps(settings.get(key))} now"
             for key in sorted(set(old) | set(settings)) if old.get(key) != settings.get(key)]
    if diffs:
        raise EvalInputError(f"{folder} holds results of different settings ("
                             + "; ".join(diffs) + "). Its results are kept: use another "
                             "--output folder, or the same settings to resume")


def load_done(path: Path) -> dict:
    """Rows already in results.jsonl by id; a partial last line (an interrupted write) is cut."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
        log("evaluate_qa", f"{path}: removed an interrupted last line "
                           f"({len(data) - len(complete)} bytes); it is generated again")
    done = {}
    for line_number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row_id = row["id"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise EvalInputError(f"{path}:{line_number}: unreadable result line ({exc}); move the "
                                 f"file away to start over") from exc
        if row_id in done:
            raise EvalInputError(f"{path}:{line_number}: id {row_id!r} appears twice")
        done[row_id] = row
    return done


def result_row(item: EvalItem, response: str, source: str) -> dict:
    prediction, score = summary_mod.score(response, item.answers)
    return {"id": item.id, "example_id": item.example_id, "context": item.context,
            "source": source, "length_tokens": item.length_tokens,
            "depth_percent": item.depth_percent, "prediction": prediction, "gold": item.answers,
            "score": score, "response": response, **item.meta}


def generate_results(eval_items: list, generate: Optional[Callable], results_path: Path,
                     batch_size: int, source: str, make_generate: Optional[Callable] = None,
                     desc: str = "generating") -> list:
    """Rows for ``eval_items`` (in their order): reused from ``results_path`` or generated
    (longest prompts first, so memory limits show up at once) and appended batch by batch.
    ``make_generate`` builds the generator lazily, only when something is left to generate."""
    done = load_done(results_path)
    todo = sorted((i for i in eval_items if i.id not in done), key=lambda i: -len(i.prompt))
    if todo:
        generate = generate or make_generate()
        start = time.time()
        with open(results_path, "a", encoding="utf-8") as out, \
                tqdm(total=len(todo), desc=desc, unit="gen", dynamic_ncols=True,
                     disable=not sys.stderr.isatty()) as bar:
            for first in range(0, len(todo), batch_size):
                batch = todo[first:first + batch_size]
                responses = generate([i.prompt for i in batch])
                if len(responses) != len(batch):
                    raise RuntimeError(f"the generator returned {len(responses)} responses for "
                                       f"{len(batch)} prompts")
                for item, response in zip(batch, responses):
                    row = result_row(item, response, source)
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    done[item.id] = row
                out.flush()
                bar.update(len(batch))
        log("evaluate_qa", f"{desc}: {len(todo)} generations in "
                           f"{time.time() - start:.1f} s ({len(eval_items) - len(todo)} reused)")
    return [done[i.id] for i in eval_items]


def build_items(cfg: EvalConfig) -> list:
    """The evaluation items for ``cfg`` (the same for every checkpoint)."""
    if cfg.mode == "triplets":
        rows = items_mod.read_heldout(cfg.input_path, items_mod.TRIPLET_FIELDS, cfg.limit)
        return items_mod.triplet_items(rows)
    if cfg.mode != "grid":
        raise EvalInputError(f"mode {cfg.mode!r}: expected 'triplets' or 'grid'")
    from data_tools.distractors import load_pool
    from data_tools.tokenizer import load_tokenizer

    rows = items_mod.read_heldout(cfg.input_path, items_mod.GRID_FIELDS, cfg.limit)
    return items_mod.grid_items(rows, load_tokenizer(cfg.tokenizer), list(cfg.lengths_tokens),
                                list(cfg.depths_percent), load_pool(cfg.distractor_pool),
                                cfg.seed)


def default_tokenizer(cfg: EvalConfig) -> str:
    for _, path in cfg.models:
        try:
            if models.checkpoint_kind(path) == "hf":
                return str(Path(path).resolve())
        except EvalInputError:
            continue  # a missing checkpoint is named (and skipped) by run_evaluation
    return "builtin:qwen2.5"


class ModelsFailedError(UserError, RuntimeError):
    """Some checkpoints could not be evaluated (each is named); the others were."""


class _UnusableModel(Exception):
    """A checkpoint that could not be found, exported or loaded (the message says why)."""


def run_evaluation(cfg: EvalConfig, generator_factory: Optional[Callable] = None) -> list:
    """Evaluate every checkpoint of ``cfg``; returns their summaries.

    ``generator_factory(name, hf_dir)`` returns ``generate(prompts) -> responses``; the default
    is greedy :func:`models.transformers_generate`. (Tests inject oracles here.)

    A checkpoint that is missing, or fails to export or load, is named and skipped; the others
    are evaluated and summarised, and then :class:`ModelsFailedError` lists the failures (a
    non-zero exit). Settings that differ from an output folder's earlier run still refuse the
    whole run before any work."""
    if not cfg.models:
        raise EvalInputError("no checkpoint given: --model NAME=PATH (repeatable)")
    names = [name for name, _ in cfg.models]
    if len(set(names)) != len(names):
        raise EvalInputError(f"checkpoint names must differ: {names}")
    if cfg.mode == "grid" and cfg.tokenizer is None:
        cfg.tokenizer = default_tokenizer(cfg)
    from data_tools.generation import resolve_backend

    backend = "injected" if generator_factory else resolve_backend(cfg.backend)
    out_dir = Path(cfg.output_dir)
    failures = {}
    settings = {}
    for name, path in cfg.models:
        try:
            settings[name] = run_settings(cfg, path, backend)
        except EvalInputError as exc:
            failures[name] = str(exc)
            log("evaluate_qa", f"skipping {name}: {exc}")
    usable = [(name, path) for name, path in cfg.models if name not in failures]
    for name, _ in usable:  # refuse before any work
        folder = out_dir / name
        if (folder / SETTINGS_FILE).is_file() or (folder / RESULTS_FILE).exists():
            check_settings(folder, settings[name])
    eval_items = build_items(cfg)
    summaries = []
    for name, path in usable:
        folder = out_dir / name
        check_settings(folder, settings[name])
        with contextlib.ExitStack() as stack:
            def load(name=name, path=path, stack=stack):
                if generator_factory is not None and models.checkpoint_kind(path) == "hf":
                    return generator_factory(name, path)
                hf_dir = stack.enter_context(models.hf_directory(path, str(folder)))
                if generator_factory is not None:
                    return generator_factory(name, hf_dir)
                return models.transformers_generate(hf_dir, cfg.backend, cfg.max_new_tokens)

            def make_generate(load=load, path=path):
                try:
                    return load()
                except Exception as exc:  # noqa: BLE001 - named, and the run ends non-zero
                    raise _UnusableModel(f"{path}: {type(exc).__name__}: {exc}") from exc
            try:
                rows = generate_results(eval_items, None, folder / RESULTS_FILE,
                                        cfg.batch_size, cfg.mode, make_generate, desc=name)
            except _UnusableModel as exc:
                failures[name] = str(exc)
                log("evaluate_qa", f"skipping {name}: could not load {exc}")
                continue
        summary = summary_mod.summarize(rows, name, cfg.num_bootstrap, cfg.seed)
        summary["settings"] = {k: v for k, v in asdict(cfg).items() if k != "models"}
        write_json(str(folder / "summary.json"), summary)
        (folder / "summary.md").write_text(summary_mod.summary_markdown([summary], name))
        plots.heatmap(summary, str(folder / "heatmap.png"))
        summaries.append(summary)
    if summaries:
        every = summaries + earlier_summaries(out_dir, names, settings[summaries[0]["name"]])
        write_json(str(out_dir / "summary.json"), {"checkpoints": every})
        (out_dir / "summary.md").write_text(summary_mod.summary_markdown(every))
        plots.comparison_bars(every, str(out_dir / "comparison.png"))
    if failures:
        lines = "\n".join(f"  {name}: {why}" for name, why in failures.items())
        done = (f"the other {len(summaries)} "
                f"{'was' if len(summaries) == 1 else 'were'} evaluated (results in {out_dir})"
                if summaries else "no checkpoint was evaluated")
        raise ModelsFailedError(f"{len(failures)} of {len(cfg.models)} checkpoints could not be "
                                f"evaluated:\n{lines}\n{done}. Fix or drop those --model "
                                f"entries and run again: finished checkpoints are not redone.")
    return summaries


def earlier_summaries(out_dir: Path, names: list, settings: dict) -> list:
    """Summaries of checkpoints evaluated into ``out_dir`` by earlier runs with the same data
    settings (everything but the weights and backend), so the folder's comparison covers them."""
    shared = {k: v for k, v in settings.items() if k not in ("model", "backend")}
    found = []
    for path in sorted(out_dir.glob(f"*/{SETTINGS_FILE}")):
        folder = path.parent
        if folder.name in names or not (folder / "summary.json").is_file():
            continue
        other = json.loads(path.read_text(encoding="utf-8"))
        if {k: other.get(k) for k in shared} == shared:
            found.append(json.loads((folder / "summary.json").read_text(encoding="utf-8")))
    return found

