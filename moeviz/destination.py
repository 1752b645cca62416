"""Where an export may write, and what it may replace.

An export writes a new folder, or replaces one that moeviz itself wrote before. Replacing is a
recursive delete, so a destination is refused when it is, or contains, anything a user cannot afford
to lose: the source model, the bundled sample data, the moeviz checkout or package, the user's home
directory, moeviz's own data folder (the run store), the Hugging Face cache, or a filesystem root.
A folder counts as moeviz's own only if it holds the plan file every export writes.
"""

from __future__ import annotations

import os
from pathlib import Path

from moeviz.errors import MoevizError

# Every export writes this file; a folder without it was not written by moeviz and is never replaced.
EXPORT_MARKER = "moeviz_plan.json"


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def protected_folders(source: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """(what, folder) pairs an export must never be, nor contain. `source`: the model's folder or hub id."""
    import moeviz
    from moeviz.data import SAMPLE_DATA_DIR
    from moeviz.store import data_dir

    package = Path(moeviz.__file__).resolve().parent
    found: list[tuple[str, Path]] = []
    if source is not None and Path(source).expanduser().exists():
        found.append(("the source model's folder", _resolved(source)))
    found.append(("moeviz's bundled sample data", _resolved(SAMPLE_DATA_DIR)))
    found.append(("the installed moeviz package", package))
    if (package.parent / "pyproject.toml").exists():  # running from a checkout (editable install)
        found.append(("the moeviz project checkout", package.parent))
    found.append(("your home directory", _resolved(Path.home())))
    found.append(("moeviz's data folder (run store, caches)", _resolved(data_dir())))
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        found.append(("the Hugging Face cache", _resolved(HF_HUB_CACHE)))
    except ImportError:  # huggingface_hub comes with transformers; without it there is no cache to protect
        pass
    return found


def is_moeviz_export(folder: Path) -> bool:
    return (folder / EXPORT_MARKER).is_file()


def check_destination(source, out: str | os.PathLike, overwrite: bool,
                      overwrite_hint: str = "pass overwrite=True (--overwrite)") -> Path:
    """The resolved folder to export to, or a MoevizError saying why `out` is refused.

    source: the loaded model (anything with `.info.source`), its folder, or its hub id.
    overwrite: allow replacing an existing folder, and then only one that a moeviz export wrote.
    overwrite_hint: how the caller's user allows replacing (the CLI's flag, the app's checkbox).
    """
    if hasattr(source, "info"):
        source = source.info.source
    out = Path(out).expanduser()
    if out.is_symlink():
        raise MoevizError(f"refusing to export to {out}: it is a symbolic link; give the real folder")
    target = out.resolve()
    if target == Path(target.anchor):
        raise MoevizError(f"refusing to export to {target}: it is a filesystem root; choose a new folder")
    protected = protected_folders(source)
    # "is X" is the more useful message where a folder both is one protected folder and contains another.
    for what, folder in protected:
        if target == folder:
            raise MoevizError(f"refusing to export to {target}: it is {what}; choose a new folder")
    for what, folder in protected:
        if target in folder.parents:
            raise MoevizError(f"refusing to export to {target}: it contains {what} ({folder}); choose a new folder")
        if what == "the source model's folder" and folder in target.parents:
            raise MoevizError(f"refusing to export into the source model's folder {folder}; choose another folder")
    if not target.exists():
        return target
    if not target.is_dir():
        raise MoevizError(f"refusing to export to {target}: it is a file; choose a new folder")
    if not any(target.iterdir()):
        return target  # an empty folder holds nothing to lose
    if not overwrite:
        raise MoevizError(f"{target} already exists; choose a new folder or {overwrite_hint}")
    if not is_moeviz_export(target):
        raise MoevizError(f"refusing to replace {target}: it was not written by a moeviz export (no {EXPORT_MARKER}); "
                          "choose a new folder")
    return target
