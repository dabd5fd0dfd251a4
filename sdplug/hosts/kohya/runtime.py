"""The kohya adapter at run time: the one adapter of a process, installed either by the launcher
(``sdplug kohya ...``, before the script runs: ``activate_for_launch``) or by the patched scripts
(``--sdplug_preset``, from inside the script: ``activate``), the SD scripts' ``adapter.KohyaAdapter``
or, for a flow script, ``flow_runtime.KohyaFlowAdapter``; taken out again by its session's undo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdplug.errors import SdplugError
from sdplug.hosts.kohya import audits
from sdplug.hosts.kohya.adapter import KohyaAdapter
from sdplug.hosts.kohya.flow_runtime import KohyaFlowAdapter
from sdplug.hosts.kohya.reconcile import (
    KohyaConflictError,
)
from sdplug.hosts.kohya.version import KohyaVersion
from sdplug.hosts.session import Session
from sdplug.log import logger, show_messages
from sdplug.preset import Preset

__all__ = ["KohyaAdapter", "KohyaConflictError", "activate", "activate_for_launch", "record_failure"]

_ACTIVE: KohyaAdapter | None = None


def _import_library(root: Path, session: Session):
    session.add_path(str(Path(root).resolve()))
    import importlib

    try:
        train_util = importlib.import_module("library.train_util")
        custom = importlib.import_module("library.custom_train_functions")
    except ImportError as exc:  # sdplug installed beside sd-scripts' requirements, not with them
        raise SdplugError(
            f"sd-scripts' library in {root} cannot be imported here ({type(exc).__name__}: {exc}). Run sdplug with the "
            "Python environment that runs sd-scripts (pip install sdplug into it)."
        ) from None
    return train_util, custom


def _install(
    preset: Preset, version: KohyaVersion, root: Path, script: str, adapter_class: type[KohyaAdapter] | None = None
) -> tuple[KohyaAdapter, Any]:
    """An adapter (``adapter_class``, the SD scripts' by default) with its hooks in sd-scripts'
    library under ``root``, and that library's custom_train_functions; nothing stays changed when
    it fails."""
    adapter = (adapter_class or KohyaAdapter)(preset, version, script)
    try:
        train_util, custom = _import_library(root, adapter.session)
        adapter.install(train_util, custom)
    except BaseException:
        adapter.session.undo()
        raise
    return adapter, custom


def _make_active(adapter: KohyaAdapter) -> None:
    global _ACTIVE
    _ACTIVE = adapter

    def inactive() -> None:
        global _ACTIVE
        if _ACTIVE is adapter:
            _ACTIVE = None

    adapter.session.on_undo(inactive)


def activate_for_launch(
    preset: Preset, version: KohyaVersion, root: Path, script: str, adapter_class: type[KohyaAdapter] | None = None
) -> KohyaAdapter:
    """Install the hooks before the script runs (the launcher route); ``adapter.session.undo()``
    takes them out again (the launcher never does: the audit is written at exit)."""
    show_messages()
    adapter, _ = _install(preset, version, root, script, adapter_class)
    _make_active(adapter)
    return adapter


def record_failure(exc: BaseException) -> bool:
    """The launcher caught an error the script stopped with: the audit says so. False when no
    adapter got as far as configuring, so no audit (nor refusal) of it will be written."""
    if _ACTIVE is None:
        return False
    _ACTIVE.record_failure(exc)
    return _ACTIVE.writes_audit


def activate(args, parser, script_globals: dict[str, Any]) -> KohyaAdapter | None:
    """Called by the patched scripts after they read their arguments (the patch route)."""
    if _ACTIVE is not None:  # launched through `sdplug kohya` as well: already active
        return _ACTIVE
    show_messages()  # no sdplug command around a patched script: this session shows them
    from sdplug.hosts.kohya.version import FLOW_ROUTES, check_flow_script, detect
    from sdplug.preset import load_preset

    script_file = Path(script_globals.get("__file__", "train_network.py"))
    root = script_file.resolve().parent
    try:
        version = detect(root)
        preset = load_preset(args.sdplug_preset)
        adapter_class: type[KohyaAdapter] | None = None
        if script_file.name in FLOW_ROUTES:  # a flow script's draw and output hooks
            check_flow_script(script_file.name, root, version, "Nothing was run.")
            adapter_class = KohyaFlowAdapter
        adapter, custom = _install(preset, version, root, script_file.name, adapter_class)
    except SdplugError as exc:  # refused before configuring: the audit says so, the message is one paragraph
        audits.write_early_refusal(exc, getattr(args, "output_dir", None), script_file.name)
        logger.error(f"error: {exc}")
        raise SystemExit(1) from None
    adapter.rebind_script_globals(script_globals, custom)
    logger.info(f"preset {preset.name!r} on sd-scripts {version.name} ({script_file.name})")
    _make_active(adapter)
    adapter.configure(args, parser)
    return adapter
