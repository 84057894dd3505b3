"""Run logs after a crash and a resume: metrics.jsonl and TensorBoard each read one clean,
increasing series (the steps logged after the last checkpoint by the crashed attempt are
dropped, then logged again by the resumed run), and a new run never appends to an old log."""

import json

import pytest

from solopo_mcore.config import LoggingConfig
from solopo_mcore.training.logs import RunLogger, rewind_metrics


def _attempt(tmp_path, start_step, steps, value):
    cfg = LoggingConfig(metrics_path=str(tmp_path / "metrics.jsonl"),
                        tensorboard_dir=str(tmp_path / "tb"), progress_bar=False)
    logger = RunLogger(cfg, total_steps=10, enabled=True, start_step=start_step)
    for step in steps:
        logger.log(step, {"loss/total": value + step})
        if step % 3 == 0:
            logger.log(step, {"loss/total": value - step}, prefix="eval/")
    logger.close()


def _tensorboard_steps(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_resume_rewinds_metrics_and_tensorboard_to_the_checkpoint_step(tmp_path):
    _attempt(tmp_path, 0, range(1, 6), 100.0)   # crashed after step 5; last checkpoint at 3
    _attempt(tmp_path, 3, range(4, 8), 200.0)   # the resumed run logs 4.. again
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [(r["step"], r["loss/total"]) for r in rows if "loss/total" in r]
    evals = [(r["step"], r["eval/loss/total"]) for r in rows if "eval/loss/total" in r]
    assert train == [(1, 101), (2, 102), (3, 103), (4, 204), (5, 205), (6, 206), (7, 207)]
    assert evals == [(3, 97), (6, 194)]
    assert _tensorboard_steps(tmp_path / "tb", "loss/total") == train
    assert _tensorboard_steps(tmp_path / "tb", "eval/loss/total") == evals


def test_a_new_run_moves_an_old_log_aside_instead_of_appending(tmp_path, capsys):
    _attempt(tmp_path, 0, range(1, 4), 100.0)
    _attempt(tmp_path, 0, range(1, 3), 300.0)   # a new run (no checkpoint) into the same paths
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss/total"]) for r in rows] == [(1, 301), (2, 302)]
    old = list(tmp_path.glob("metrics.jsonl.before-*"))
    assert len(old) == 1 and len(old[0].read_text().splitlines()) == 4  # 3 steps + 1 eval
    assert str(old[0]) in capsys.readouterr().out
    assert _tensorboard_steps(tmp_path / "tb", "loss/total") == [(1, 301), (2, 302)]


def test_rewind_drops_a_torn_last_line_and_names_a_corrupt_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss/total": 1.0}\n{"step": 2, "loss/total": 2.0}\n'
                    '{"step": 3, "loss/to')  # the crash cut the last write
    assert rewind_metrics(path, 2) == 1
    assert path.read_text().splitlines() == ['{"step": 1, "loss/total": 1.0}',
                                             '{"step": 2, "loss/total": 2.0}']
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        rewind_metrics(path, 1)
