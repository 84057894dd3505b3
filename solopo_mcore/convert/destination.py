"""Where a conversion writes: never over its source, and never deleting the old destination
before its replacement is complete (and verified, with ``--verify``).

The converter writes into the sibling ``DST.partial``; :meth:`StagedDestination.commit` then
renames an existing ``DST`` to ``DST.old``, ``DST.partial`` to ``DST``, and only then deletes
``DST.old`` (restoring it if the second rename fails). A failed verification renames
``DST.partial`` to ``DST.failed-verify`` and leaves ``DST`` as it was. Only rank 0 touches the
file system; the methods are collective (barriers) when torch.distributed is initialised.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from solopo_mcore.convert.tables import ConversionError
from solopo_mcore.storage.paths import refuse_overlaps
from solopo_mcore.storage.space import WRITE_ERRORS, free_text, is_out_of_space


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


#: Marks a folder this converter created (staging, failed verification); only those are removed.
OWN_MARKER = ".solopo-convert-staging"
#: The siblings of DST the converter writes or replaces.
SIBLING_SUFFIXES = (".partial", ".old", ".failed-verify", ".config_tmp")


def check_source_and_destination(src: str, dst: str) -> None:
    """Refuse a destination that is, contains or lies inside the source (after resolving
    relative paths and symlinks), and a source that is one of the destination's sibling
    folders the converter writes or replaces (``DST.partial``, ``DST.old``, ...): either
    would delete the source."""
    outputs = {"--dst": dst}
    outputs.update({f"--dst{suffix}": str(Path(dst).with_name(Path(dst).name + suffix))
                    for suffix in SIBLING_SUFFIXES})
    refuse_overlaps("convert", {"--src": src}, outputs,
                    "Choose a --dst outside --src (and --src not named after --dst).",
                    error=ConversionError)


def _looks_like_a_model(folder: Path) -> bool:
    """A Megatron checkpoint (save_dir or iteration) or an HF model folder."""
    names = {p.name for p in folder.iterdir()}
    return bool(names & {"latest", "metadata.json", "config.json",
                         "model.safetensors.index.json", "model.safetensors"}) or \
        any(n.startswith("iter_") for n in names)


class StagedDestination:
    """A destination directory written through a sibling staging directory."""

    def __init__(self, dst: str, overwrite: bool):
        self.final = Path(dst)
        self.staging = self.final.with_name(self.final.name + ".partial")
        self.failed = self.final.with_name(self.final.name + ".failed-verify")
        self.old = self.final.with_name(self.final.name + ".old")
        self.overwrite = overwrite

    def check(self) -> None:
        """Refuse, before any work: an existing non-empty destination without ``--overwrite``,
        or with it when the destination holds no model (it would be deleted); sibling folders
        the converter would replace that it did not create (``DST.old`` always)."""
        if self.final.exists() and not self.final.is_dir():
            raise ConversionError(f"destination {self.final} exists and is not a directory; "
                                  f"choose another --dst")
        if self.final.is_dir() and any(self.final.iterdir()):
            if not self.overwrite:
                raise ConversionError(f"destination {self.final} exists and is not empty; pass "
                                      f"--overwrite to replace it once the conversion is "
                                      f"complete")
            if not _looks_like_a_model(self.final):
                raise ConversionError(f"destination {self.final} holds neither a Megatron "
                                      f"checkpoint nor an HF model; --overwrite would delete "
                                      f"its files. Choose another --dst, or empty it yourself")
        for folder in (self.staging, self.failed):
            if folder.exists() and not (folder / OWN_MARKER).exists():
                raise ConversionError(f"{folder} exists and was not made by this converter; "
                                      f"the conversion would delete it. Move it away, or "
                                      f"choose another --dst")
        if self.old.exists():
            raise ConversionError(f"{self.old} exists (a backup of {self.final.name}, made by "
                                  f"an interrupted replacement or by you); the conversion "
                                  f"would delete it. Move it away, or choose another --dst")

    def prepare(self) -> Path:
        """Collective: an empty staging directory (a leftover of an interrupted run is
        removed). Returns its path. Only rank 0 checks again here: the others passed
        :meth:`check` before the collectives that precede this, and may otherwise see the
        staging folder rank 0 is creating."""
        if _is_rank0():
            self.check()
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
            (self.staging / OWN_MARKER).touch()
        _barrier()
        return self.staging

    @contextlib.contextmanager
    def writing(self):
        """Around the writes into the staging directory: a full disk (however it arrives:
        :mod:`solopo_mcore.storage.space`) removes the staging directory and becomes one line;
        ``DST`` is untouched either way."""
        try:
            yield self.staging
        except WRITE_ERRORS as exc:
            if not is_out_of_space(exc, self.staging):
                raise
            if _is_rank0():
                shutil.rmtree(self.staging, ignore_errors=True)
            kept = f"{self.final} is unchanged" if self.final.exists() else \
                f"{self.final} was not created"
            raise ConversionError(
                f"no space left on the device writing {self.staging}: {free_text(self.final)} "
                f"after removing the partial result; {kept}. Free space or choose a --dst on a "
                f"larger disk, and run the same command again") from None

    def commit(self) -> Path:
        """Collective: the staging directory becomes the destination."""
        _barrier()
        if _is_rank0():
            (self.staging / OWN_MARKER).unlink(missing_ok=True)
            if self.final.exists():
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
