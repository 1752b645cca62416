"""Files moeviz ships beside its code: the demo model and bundled texts (`sample_data/`) and the
Streamlit app (`app.py`, `pages/`).

In a source checkout they live at the repository root. A built wheel (`pip install .`, non-editable)
carries a copy under `moeviz/_bundled/`, written by `setup.py` at build time, so an installed moeviz
finds its demo model and app without the checkout. The copy of the app is data for `moeviz app`
(Streamlit runs it as a script); the `moeviz` library itself never imports it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_DIR = PACKAGE_DIR / "_bundled"
# Everything setup.py copies into the wheel (paths relative to the repository root); setup.py reads this.
SHIPPED = ("app.py", "pages", "sample_data")


def shipped_path(relative: str) -> Path:
    """Where a shipped file is: the installed copy if there is one, else the checkout's."""
    bundled = BUNDLED_DIR / relative
    return bundled if bundled.exists() else PACKAGE_DIR.parent / relative


SAMPLE_DATA_DIR = shipped_path("sample_data")
APP_FILE = shipped_path("app.py")


def data_dir() -> Path:
    """Where moeviz keeps its files: ``$MOEVIZ_DATA_DIR``, else the platform's user cache dir."""
    env = os.environ.get("MOEVIZ_DATA_DIR")
    if env:
        return Path(env).expanduser()
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "moeviz"
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        return (Path(local) if local else home / "AppData" / "Local") / "moeviz" / "Cache"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else home / ".cache") / "moeviz"
