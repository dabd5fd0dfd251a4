"""Where the presets and patches shipped with sdplug are, in a wheel and in a source checkout.

The repository keeps them at its top (``presets/``, ``patches/``); a built wheel installs them
inside the package as ``sdplug/_presets`` and ``sdplug/_patches`` (pyproject's package-dir).
They are looked up by plain file paths next to this module, not through
``importlib.resources``: those two folders have no ``__init__.py``, so the resource API treats
them as namespace packages and ``str()`` of what it returns is no path at all (which once made
every non-editable install lose its presets).
"""

from __future__ import annotations

from pathlib import Path

from sdplug.errors import SdplugError

_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """The shipped ``presets`` or ``patches`` folder of this installation."""
    installed = _PACKAGE / f"_{name}"
    if installed.is_dir():
        return installed
    source = _PACKAGE.parent / name  # a source checkout, or an editable install of one
    if source.is_dir() and (_PACKAGE.parent / "pyproject.toml").is_file():
        return source
    raise SdplugError(
        f"this sdplug installation has no shipped {name} (looked in {installed} and {source}). "
        "Reinstall it: pip install --force-reinstall --no-deps sdplug"
    )
