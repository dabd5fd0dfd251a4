"""The argument names of sd-scripts' training parsers, read by building the real parsers.

    python tests/hosts/kohya_parser_flags.py SD_SCRIPTS_DIR [--stub-missing] [--write VERSION | --write-flow]

prints ``{"script": ["flag", ...], ...}`` (JSON, sorted) for the four scripts the kohya adapter
supports, or with ``--write main`` / ``--write v0.8.7`` puts them in the committed names file.
Each script is imported (not run) and its own ``setup_parser()`` is called, so the names are
exactly what that tree's argparse accepts. ``tests/data/kohya_parser_flags.json``
holds them for sd-scripts main and v0.8.7, so CI (no sd-scripts tree) can check that the
adapter's flag table classifies every flag of the families a preset can set.

``--stub-missing`` stands in an empty module for every package outside the standard library
and the tree (a machine without sd-scripts' requirements): building a parser needs none of them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

SCRIPTS = ("train_network.py", "sdxl_train_network.py", "train_db.py", "fine_tune.py")
# sd-scripts main's rectified-flow LoRA scripts: their arguments, with what each takes, go to
# ``tests/data/kohya_flow_parsers.json`` (``--write-flow``), from which the stand-in tree builds
# its parsers
FLOW_SCRIPTS = (
    "flux_train_network.py",
    "sd3_train_network.py",
    "lumina_train_network.py",
    "hunyuan_image_train_network.py",
    "anima_train_network.py",
)


class _Stub(type):
    """A class that is anything: callable, subscriptable, an attribute of itself, a base class."""

    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stub(name)

    def __getitem__(cls, item):
        return cls

    def __call__(cls, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # used as a decorator
        return cls

    def __or__(cls, other):
        return cls

    __ror__ = __or__

    def __iter__(cls):
        return iter(())

    def __bool__(cls):
        return False


def _stub(name: str):
    return _Stub(name, (), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stub(name)


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """First on sys.meta_path: every module outside the standard library and the sd-scripts
    tree is an empty stub, so no installed package (of whatever version) runs at all."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def find_spec(self, fullname, path, target=None):
        top = fullname.partition(".")[0]
        if top in sys.stdlib_module_names or (self.root / top).is_dir() or (self.root / f"{top}.py").is_file():
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _parser(root: Path, script: str):
    root = Path(root).resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location(Path(script).stem, root / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # sdxl_train_network imports train_network by name
    spec.loader.exec_module(module)
    return module.setup_parser()


def parser_flags(root: Path) -> dict[str, list[str]]:
    flags = {}
    for script in SCRIPTS:
        parser = _parser(root, script)
        names = {o[2:] for action in parser._actions for o in action.option_strings if o.startswith("--")}
        flags[script] = sorted(names - {"help"})
    return flags


def _plain(value):
    """A default as JSON holds it (a stub or an object: its text)."""
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def flow_arguments(root: Path) -> dict[str, dict[str, dict]]:
    """Each flow script's arguments: whether one takes a value, its default and choices."""
    scripts = {}
    for script in FLOW_SCRIPTS:
        arguments = {}
        for action in _parser(root, script)._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    entry = {"value": action.nargs != 0, "default": _plain(action.default)}
                    if action.choices:
                        entry["choices"] = [_plain(c) for c in action.choices]
                    if action.nargs not in (None, 0):
                        entry["nargs"] = action.nargs
                    arguments[option[2:]] = entry
        scripts[script] = dict(sorted(arguments.items()))
    return scripts


def write(root: Path, version: str, flags: dict[str, list[str]]) -> Path:
    """Replace ``version``'s entry of the committed names file (with the tree's git commit)."""
    import subprocess

    path = Path(__file__).parents[1] / "data" / "kohya_parser_flags.json"
    data = json.loads(path.read_text())
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    data[version] = {"commit": commit or "unknown", "scripts": flags}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def write_flow(root: Path, scripts: dict[str, dict[str, dict]]) -> Path:
    """Write the flow scripts' arguments (with the tree's git commit) to their committed file."""
    import subprocess

    path = Path(__file__).parents[1] / "data" / "kohya_flow_parsers.json"
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    about = "sd-scripts main's flow scripts' arguments, read by tests/hosts/kohya_parser_flags.py --write-flow"
    path.write_text(json.dumps({"about": about, "commit": commit or "unknown", "scripts": scripts}, indent=1) + "\n")
    return path


if __name__ == "__main__":  # python tests/hosts/kohya_parser_flags.py DIR [--stub-missing] [--write VERSION | --write-flow]
    arguments = sys.argv[1:]
    target = arguments[arguments.index("--write") + 1] if "--write" in arguments else None
    directory = Path(next(a for a in arguments if not a.startswith("--") and a != target))
    if "--stub-missing" in arguments:
        sys.meta_path.insert(0, _StubFinder(directory))
    if "--write-flow" in arguments:
        print(write_flow(directory, flow_arguments(directory)))
    else:
        found = parser_flags(directory)
        print(write(directory, target, found) if target else json.dumps(found, indent=1, sort_keys=True))
