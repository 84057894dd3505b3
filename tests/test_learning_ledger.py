"""bench_learning's committed ledger: rows survive kills and merges, bad lines are named, and the
table's mean and spread are the written-out formulas over seeds."""

import json
import statistics

import pytest

from benchmarks.learning_ledger import append_row, read_ledger, summarize


def _row(seed, name, short, long, settings_id="abc"):
    return {"model": "m", "length": 512, "seed": seed, "settings_id": settings_id, "name": name,
            "arm": name, "steps": 24, "answer": {"short": {"value": short},
                                                 "long": {"value": long}}}


def test_ledger_keeps_rows_across_kills_and_names_bad_lines(tmp_path, capsys):
    ledger = tmp_path / "learning.jsonl"
    assert read_ledger(ledger) == []
    append_row(ledger, _row(0, "base", 0.9, 0.3))
    append_row(ledger, _row(0, "orpo-solo", 0.8, 0.5))
    assert ledger.read_text().endswith("\n")
    assert "commit" in read_ledger(ledger)[0]["environment"]

    # a whole last row whose newline was dropped (an editor) is kept, and the newline restored
    ledger.write_text(ledger.read_text()[:-1])
    assert [r["name"] for r in read_ledger(ledger)] == ["base", "orpo-solo"]
    assert ledger.read_text().endswith("}\n")

    # a kill mid-write: the incomplete line is cut off into .cut-1, nothing else is lost
    with open(ledger, "a") as f:
        f.write('{"model": "m", "length": 5')
    assert [r["name"] for r in read_ledger(ledger)] == ["base", "orpo-solo"]
    assert (tmp_path / "learning.jsonl.cut-1").read_text() == '{"model": "m", "length": 5'
    assert "incomplete line" in capsys.readouterr().out
    append_row(ledger, _row(1, "base", 0.7, 0.2))
    assert [r["seed"] for r in read_ledger(ledger)] == [0, 0, 1]

    # the same measurement twice (two merged ledgers): reported, the first one used
    first = ledger.read_text().splitlines()[1]
    duplicate = json.loads(first)
    duplicate["answer"]["long"]["value"] = 0.0
    with open(ledger, "a") as f:
        f.write(json.dumps(duplicate) + "\n")
    rows = read_ledger(ledger)
    assert len(rows) == 3 and rows[1]["answer"]["long"]["value"] == 0.5
    assert "line 4" in capsys.readouterr().out

    # a line that is JSON but not a row, or not JSON at all, stops the read naming the line
    for bad, said in (('[1, 2]', "line 5 is not a result row"), ('{"name": "x"}', "no model"),
                      ("nope", "line 5 is not JSON")):
        text = ledger.read_text()
        ledger.write_text(text + bad + "\n")
        with pytest.raises(SystemExit, match=said):
            read_ledger(ledger)
        ledger.write_text(text)


def test_summary_is_mean_and_sd_over_seeds_per_settings(tmp_path):
    ledger = tmp_path / "learning.jsonl"
    longs = [0.42, 0.56, 0.31]
    for seed, value in enumerate(longs):
        append_row(ledger, _row(seed, "orpo-solo", 0.9, value))
    append_row(ledger, _row(0, "orpo-solo", 0.1, 0.1, settings_id="other"))
    table = summarize(read_ledger(ledger), ledger)
    lines = {tuple(c.strip() for c in line.split("|")[2:5]): line
             for line in table.splitlines()[2:]}
    expected = (f"{statistics.mean(longs):.2f} ± {statistics.stdev(longs):.2f} "
                f"(0.42, 0.56, 0.31)")
    assert expected in lines[("abc", "512", "orpo-solo")]
    assert "| 0,1,2 |" in lines[("abc", "512", "orpo-solo")]
    # another settings fingerprint is its own row, never averaged in
    assert "| 0.10 |" in lines[("other", "512", "orpo-solo")]
    assert (tmp_path / "learning.md").read_text() == table
    assert (tmp_path / "learning_m.png").stat().st_size > 0
