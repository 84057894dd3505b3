"""Where a conversion writes: never over its source, and never deleting the old destination
before its replacement is complete (and verified, with ``--verify``).

The converter writes into the sibling ``DST.partial``; :meth:`StagedDestination.commit` then
renames an existing ``DST`` to ``DST.old``, ``DST.partial`` to ``DST``, and only then deletes
``DST.old`` (restoring it if the second rename fails). A failed verification renames
``DST.partial`` to ``DST.failed-verify`` and leaves ``DST`` as it was. Only rank 0 touches the
file system; the methods are collective (barriers) when torch.distributed is initialised.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from solopo_mcore.convert.tables import ConversionError
from solopo_mcore.storage.paths import refuse_overlaps


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _is_rank0() -> bool:
    dist = _dist()
    return dist is None or dist.get_rank() == 0


def _barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def check_source_and_destination(src: str, dst: str) -> None:
    """Refuse a destination that is, contains or lies inside the source (after resolving
    relative paths and symlinks): ``--overwrite`` would delete the source."""
    refuse_overlaps("convert", {"--src": src}, {"--dst": dst}, "Choose a --dst outside --src.",
                    error=ConversionError)


class StagedDestination:
    """A destination directory written through a sibling staging directory."""

    def __init__(self, dst: str, overwrite: bool):
        self.final = Path(dst)
        self.staging = self.final.with_name(self.final.name + ".partial")
        self.failed = self.final.with_name(self.final.name + ".failed-verify")
        self.old = self.final.with_name(self.final.name + ".old")
        self.overwrite = overwrite

    def check(self) -> None:
        """Refuse an existing non-empty destination without ``--overwrite`` (before any work)."""
        if self.final.exists() and not self.final.is_dir():
            raise ConversionError(f"destination {self.final} exists and is not a directory; "
                                  f"choose another --dst")
        if self.final.is_dir() and any(self.final.iterdir()) and not self.overwrite:
            raise ConversionError(f"destination {self.final} exists and is not empty; pass "
                                  f"--overwrite to replace it once the conversion is complete")

    def prepare(self) -> Path:
        """Collective: an empty staging directory (a leftover of an interrupted run is
        removed). Returns its path."""
        self.check()
        if _is_rank0():
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
        _barrier()
        return self.staging

    def commit(self) -> Path:
        """Collective: the staging directory becomes the destination."""
        _barrier()
        if _is_rank0():
            if self.final.exists():
                shutil.rmtree(self.old, ignore_errors=True)
                os.replace(self.final, self.old)
                try:
                    os.replace(self.staging, self.final)
                except BaseException:
                    os.replace(self.old, self.final)
                    raise
                shutil.rmtree(self.old)
            else:
                self.final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.staging, self.final)
        _barrier()
        return self.final

    def fail_verification(self, error: BaseException) -> ConversionError:
        """Collective: keep the unverified result as ``DST.failed-verify``, leave ``DST`` alone;
        returns the error to raise."""
        _barrier()
        if _is_rank0():
            shutil.rmtree(self.failed, ignore_errors=True)
            os.replace(self.staging, self.failed)
        _barrier()
        kept = f"{self.final} is unchanged" if self.final.exists() else \
            f"{self.final} was not created"
        return ConversionError(f"{error}; the unverified result is kept in {self.failed} for "
                               f"inspection and {kept}")
