"""Rewrite tests/golden/convergence_1proc.json from a fresh single-process convergence run.

    .venv/bin/python tests/golden/regenerate.py [--dry-run] [--keep DIR]

Regenerate ONLY ON PURPOSE: when a change is meant to change the curve (the data pipeline, the
tiny model, the recipe, the objective, the optimizer), never to make a failing golden check pass.
Write the reason in the commit message. The script builds the same inputs and runs the same
command as tests/test_convergence.py (tests/helpers/convergence.py), prints how far the new curve
is from the stored one, and writes the file unless --dry-run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from tests.helpers import convergence as cv  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="compare with the stored file, write nothing")
    parser.add_argument("--keep", help="build the inputs and run in DIR (kept) instead of a "
                                       "temporary directory")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="solopo-golden-") as tmp:
        work = Path(args.keep or tmp)
        inputs = cv.build_inputs(work / "inputs")
        curve = cv.run_layout(inputs, "1proc", work / "run_1proc")
    record = cv.golden_record(inputs, curve)
    if cv.GOLDEN_PATH.exists():
        old = cv.load_golden()
        for line in cv.settings_differences(old["settings"], record["settings"]):
            print(f"settings changed: {line}")
        if old["inputs"] != record["inputs"]:
            print(f"inputs changed: {old['inputs']} -> {record['inputs']}")
        if old["curve"]["step"] == record["curve"]["step"]:
            measured = {key: cv.differences(record["curve"], old["curve"], key)
                        for key in cv.CURVE_KEYS}
            print(f"new curve vs stored: {cv.describe(measured)}")
        else:
            print("the new curve has other steps than the stored one")
    print(f"loss {curve['loss/total'][0]:.4f} -> {curve['loss/total'][-1]:.4f} over "
          f"{len(curve['step'])} steps, with {record['produced_with']}")
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    cv.write_golden(record)
    print(f"wrote {cv.GOLDEN_PATH}; commit it with the reason in the message")
    return 0


if __name__ == "__main__":
    sys.exit(main())
