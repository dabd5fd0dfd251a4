"""sdplug's messages: library code logs to the "sdplug" logger; front ends show it once, on stderr."""

import logging

from sdplug.log import logger, show_messages


def test_show_messages_installs_one_handler_and_writes_sdplug_lines(capsys):
    show_messages()
    show_messages()  # every front end calls it; still one line per message
    shown = [h for h in logger.handlers if type(h).__name__ == "_ToStderr"]
    assert len(shown) == 1 and logger.level == logging.INFO
    logger.info("a rule")
    logger.debug("not shown")
    assert capsys.readouterr().err == "sdplug: a rule\n"


def test_library_code_does_not_print():
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "sdplug"
    # front ends print (the command line, the trainer's own screen, benches); nothing else does
    allowed = {"cli.py", "cli_bridges.py", "loop.py", "launcher.py", "flag_check.py"}  # flag_check: `sdplug check kohya`
    allowed |= {p.name for p in (package / "bench").glob("*.py")}
    offenders = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print" and path.name not in allowed:
                offenders.append(f"{path.relative_to(package)}:{node.lineno}")
    assert offenders == []
