"""Build hook: copy the demo model, bundled texts and the Streamlit app into the wheel.

They live at the repository root (the layout users and contributors see); `moeviz.resources` finds
them there in a checkout and under `moeviz/_bundled/` in an installed wheel. Project metadata is in
pyproject.toml.
"""

import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# The list lives in moeviz/resources.py (which finds the files again at run time); read it from the file so
# building needs no import of the package (and of torch).
SHIPPED = runpy.run_path(str(ROOT / "moeviz" / "resources.py"))["SHIPPED"]


class BuildPyWithShippedFiles(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads them from the checkout
            return
        dest = Path(self.build_lib) / "moeviz" / "_bundled"
        for name in SHIPPED:
            src, out = ROOT / name, dest / name
            if src.is_dir():
                shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)


setup(cmdclass={"build_py": BuildPyWithShippedFiles})
