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
             directory: Optional[str] = None, config: Optional[dict] = None,
             start_step: int = 0):
    """A wandb run; with ``run_id`` an existing run is resumed (or created with that id).

    A training run resuming from a checkpoint at ``start_step`` > 0 rewinds the W&B run to that
    step (``resume_from="ID?_step=N"``): the steps an interrupted attempt logged after its last
    checkpoint are logged again, and W&B keeps only the new ones. Where the server refuses a
    rewind, the run is resumed as it is, with a warning (W&B then ignores the repeated steps
    and shows the earlier attempt's values for them)."""
    wandb = _wandb()
    if directory:
        import os
        os.makedirs(directory, exist_ok=True)
    kwargs = dict(project=project, entity=entity, name=name, tags=list(tags or []) or None,
                  config=config, dir=directory)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if run_id and start_step > 0:
        try:
            return wandb.init(**kwargs, resume_from=f"{run_id}?_step={start_step}")
        except Exception as exc:  # noqa: BLE001 - an older server or a plan without rewind
            from solopo_mcore.log import warn
            warn("wandb", f"could not rewind W&B run {run_id} to step {start_step} ({exc}); "
                          f"resuming it as it is: steps after {start_step} show the earlier "
                          f"attempt's values")
    if run_id:
        kwargs.update(id=run_id, resume="allow")
    return wandb.init(**kwargs)


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
