"""Outputs apart from inputs: the one check every entry point runs on the paths it writes.

An output may not be an input, contain one, or lie inside one, after resolving relative paths,
``..``, symlinks and hard links: writing it (or replacing it, as a staged export does) would
overwrite or delete what the run reads, or mix new files into an input's folder. Used by config
validation (every output key of a run against every input key), the data tools and the
converter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

from solopo_mcore.errors import UserError


class OutputOverlapsInputError(UserError, ValueError):
    """An output path that is, contains or lies inside an input path."""


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)  # also hard links
    return a.resolve() == b.resolve()


def overlap(output: str, input_path: str) -> Optional[str]:
    """How ``output`` overlaps ``input_path``: "is", "contains", "lies inside", or None."""
    out, inp = Path(output), Path(input_path)
    if _same(out, inp):
        return "is"
    out_r, in_r = out.resolve(), inp.resolve()
    if out_r in in_r.parents:
        return "contains"
    if in_r in out_r.parents:
        return "lies inside"
    return None


def refuse_overlaps(what: str, inputs: Mapping[str, Optional[str]],
                    outputs: Mapping[str, Optional[str]], fix: str,
                    error: type = OutputOverlapsInputError) -> None:
    """Raise ``error`` for the first output that is, contains or lies inside an input.

    ``inputs``/``outputs`` map a name (a config key or an option, e.g. ``--input``) to a path;
    ``None`` paths are skipped. ``fix`` ends the message."""
    for out_name, out_path in outputs.items():
        for in_name, in_path in inputs.items():
            if out_path is None or in_path is None:
                continue
            how = overlap(str(out_path), str(in_path))
            if how is None:
                continue
            consequence = {"is": "writing it would destroy the input",
                           "contains": "replacing or cleaning it would delete the input",
                           "lies inside": "it would write into the input"}[how]
            same = " the same path as" if how == "is" else ""
            raise error(f"{what}: {out_name} {out_path} {how}{same} {in_name} {in_path}; "
                        f"{consequence}. {fix}")
