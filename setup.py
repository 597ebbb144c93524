"""Build hook: install ``cycguard-gadgetron.pth`` at the top of site-packages (everything else is in setup.cfg).

The .pth makes gadgetron-python stop at a closed socket instead of spinning
(``gadgets/eofguard.py``). An editable install (``pip install -e``) does not copy it;
``scripts/bootstrap.sh`` does.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "cycguard-gadgetron.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(Path("gadgets") / PTH), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
