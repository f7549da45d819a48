"""Imports every `cmd_*.py` module in this package; each registers its commands on `app`."""

import importlib
import pkgutil

from . import __path__ as _pkg_path

for _mod in sorted(m.name for m in pkgutil.iter_modules(_pkg_path) if m.name.startswith("cmd_")):
    importlib.import_module(f"{__package__}.{_mod}")
