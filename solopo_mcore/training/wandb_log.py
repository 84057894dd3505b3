"""Optional Weights & Biases logging (``pip install solopo-mcore[wandb]``).

Training: :class:`solopo_mcore.training.logs.RunLogger` opens a run when
``logging.wandb_project`` is set, on the logging rank only, logs the run config once and then
the same metric keys as ``metrics.jsonl`` at the same steps. ``WANDB_MODE=offline`` (or
``disabled``) and the other ``WANDB_*`` variables are honoured by wandb itself.
Evaluation: :func:`log_eval_summaries` adds ``examples/evaluate_qa.py``'s summary to a run
(the training run when its id is given).
"""

from __future__ import annotations

import math
from typing import Optional


def _wandb():
    try:
        import wandb
    except ImportError as exc:
        raise ImportError("W&B logging was asked for (logging.wandb_project / --wandb-project) "
                          "but wandb is not installed: pip install 'solopo-mcore[wandb]'") from exc
    return wandb


def init_run(project: str, entity: Optional[str] = None, name: Optional[str] = None,
             tags: Optional[list] = None, run_id: Optional[str] = None,
             directory: Optional[str] = None, config: Optional[dict] = None):
    """A wandb run; with ``run_id`` an existing run is resumed (or created with that id)."""
    wandb = _wandb()
    if directory:
        import os
        os.makedirs(directory, exist_ok=True)
    kwargs = dict(project=project, entity=entity, name=name, tags=list(tags or []) or None,
                  config=config, dir=directory)
    if run_id:
        kwargs.update(id=run_id, resume="allow")
    return wandb.init(**{k: v for k, v in kwargs.items() if v is not None})


def finite_scalars(record: dict) -> dict:
    """The int/float entries of a metrics record that W&B can chart (no NaN / inf)."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def eval_metrics(summaries: list) -> dict:
    """``eval_qa/<checkpoint>/<metric>`` scalars (value, ci95_low, ci95_high, n)."""
    out = {}
    for s in summaries:
        for metric in ("accuracy_short", "accuracy_long", "gap"):
            m = s[metric]
            if m["value"] is None:
                continue
            key = f"eval_qa/{s['name']}/{metric}"
            out[key] = m["value"]
            out[key + "_n"] = m["n"]
            if m["ci95"]:
                out[key + "_ci95_low"], out[key + "_ci95_high"] = m["ci95"]
    return out


def log_eval_summaries(summaries: list, output_dir: str, project: str,
                       entity: Optional[str] = None, run_id: Optional[str] = None,
                       name: Optional[str] = None, directory: Optional[str] = None) -> str:
    """Put the evaluation metrics in the run summary, the figures as images and
    ``summary.json`` / ``results.jsonl`` folders as files; returns the run id."""
    import os

    wandb = _wandb()
    run = init_run(project, entity, name, ["eval_qa"], run_id, directory, None)
    try:
        metrics = eval_metrics(summaries)
        for key, value in metrics.items():
            run.summary[key] = value
        images = {}
        for s in summaries:
            path = os.path.join(output_dir, s["name"], "heatmap.png")
            if os.path.isfile(path):
                images[f"eval_qa/{s['name']}/heatmap"] = wandb.Image(path)
        comparison = os.path.join(output_dir, "comparison.png")
        if os.path.isfile(comparison):
            images["eval_qa/comparison"] = wandb.Image(comparison)
        if images:
            run.log(images, commit=True)
        return run.id
    finally:
        run.finish()
