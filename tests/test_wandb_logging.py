"""Optional W&B logging, offline: the run W&B writes holds the config once and, at each step,
the same metric keys as metrics.jsonl; evaluate_qa's summary lands in the run it names."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from solopo_mcore.config import LoggingConfig
from solopo_mcore.training.logs import RunLogger

import wandb  # noqa: F401,E402  (in the test extra: scripts/setup.sh installs it)


def _records(run_dir: Path) -> list:
    """The records of an offline run, read back with wandb's own reader (`wandb leet inspect`)."""
    cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(cli), "leet", "inspect", "--json", str(run_dir)], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_default"))
    return tmp_path


def test_wandb_offline_run_has_config_and_metrics_keys(offline):
    tmp_path = offline
    cfg = LoggingConfig(metrics_path=str(tmp_path / "metrics.jsonl"), progress_bar=False,
                        wandb_project="solopo-test", wandb_run_name="tiny-run",
                        wandb_tags=["ci", "tiny"], wandb_dir=str(tmp_path))
    steps = {1: {"loss/total": 0.7, "accuracy/short": 0.5, "time/step_sec": 0.1},
             2: {"loss/total": 0.6, "accuracy/short": 1.0, "time/step_sec": 0.1,
                 "reward/margin_short": float("nan")}}
    logger = RunLogger(cfg, total_steps=2, enabled=True, run_config={"objective": {"beta": 0.1}})
    run_id = logger.wandb_run.id
    for step, metrics in steps.items():
        logger.log(step, metrics)
    logger.log(2, {"accuracy/long": 0.25}, prefix="eval/")
    logger.close()
    silent = RunLogger(LoggingConfig(wandb_project="solopo-test", wandb_dir=str(tmp_path / "r1")),
                       total_steps=2, enabled=False)  # not the logging rank: no run
    silent.log(1, {"loss/total": 1.0})
    silent.close()
    assert silent.wandb_run is None and not (tmp_path / "r1").exists()

    run_dirs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(run_dirs) == 1
    records = _records(run_dirs[0])
    run = next(r["run"] for r in records if r["type"] == "run")
    assert (run["display_name"], run["project"], run["tags"]) == ("tiny-run", "solopo-test",
                                                                  ["ci", "tiny"])
    assert run["config"]["update"]["objective"] == {"beta": 0.1}
    history = {}
    for r in records:
        if r["type"] == "history":
            item = {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
            history.setdefault(int(r["history"]["step"]["num"]), {}).update(item)
    expected = {}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        step = rec.pop("step")
        expected.setdefault(step, {}).update(
            {k: v for k, v in rec.items() if v == v})  # NaN is not sent to W&B
    assert history == expected
    assert set(history[2]) == {"loss/total", "accuracy/short", "time/step_sec",
                               "eval/accuracy/long"}


def test_eval_summary_is_logged_to_the_named_run(offline):
    from solopo_mcore.training.wandb_log import log_eval_summaries

    metric = {"value": 0.5, "ci95": [0.25, 0.75], "n": 8}
    summaries = [{"name": "solo", "accuracy_short": metric, "accuracy_long": metric,
                  "gap": {"value": 0.0, "ci95": [-0.25, 0.25], "n": 8}}]
    run_id = log_eval_summaries(summaries, str(offline), "solopo-test", run_id="trainrun01",
                                directory=str(offline / "eval_wandb"))
    assert run_id == "trainrun01"
    run_dir = next(Path(offline / "eval_wandb" / "wandb").glob("offline-run-*-trainrun01"))
    summary = {}
    for r in _records(run_dir):
        if r["type"] == "summary":
            summary.update(r["summary"]["update"])
    assert summary["eval_qa/solo/accuracy_short"] == 0.5
    assert summary["eval_qa/solo/gap_ci95_low"] == -0.25
    assert summary["eval_qa/solo/accuracy_long_n"] == 8


def test_a_resumed_run_rewinds_its_wandb_run_to_the_checkpoint_step(monkeypatch, tmp_path):
    """Resuming at step 3 asks W&B to rewind the run to step 3 (so the interrupted attempt's
    steps 4.. are replaced, not kept); a server that refuses gets the plain resume."""
    from solopo_mcore.training import wandb_log

    calls = []

    class FakeRun:
        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    class FakeWandb:
        refuse_rewind = False

        @classmethod
        def init(cls, **kwargs):
            calls.append(kwargs)
            if "resume_from" in kwargs and cls.refuse_rewind:
                raise RuntimeError("rewind is not enabled")
            return FakeRun()
    monkeypatch.setattr(wandb_log, "_wandb", lambda: FakeWandb)
    cfg = LoggingConfig(progress_bar=False, wandb_project="p", wandb_run_id="run-7")
    RunLogger(cfg, 10, True, start_step=3).close()
    assert calls[-1]["resume_from"] == "run-7?_step=3" and "resume" not in calls[-1]
    RunLogger(cfg, 10, True, start_step=0).close()  # a new run: plain id + resume
    assert calls[-1]["id"] == "run-7" and calls[-1]["resume"] == "allow"
    FakeWandb.refuse_rewind = True
    RunLogger(cfg, 10, True, start_step=3).close()
    assert "resume_from" in calls[-2] and calls[-1]["resume"] == "allow"
