"""The command line starts fast: its parser and every ``--help`` import no torch, and the package
loads its public names on first use (PEP 562). Each check runs in a fresh interpreter, since this
one has torch loaded already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from mini_transformer.cli import COMMANDS

from .conftest import REPO_ROOT


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_help_of_the_cli_and_of_every_command_imports_no_torch():
    report = run_python(f"""
        import contextlib, io, json, sys
        from mini_transformer.cli import build_parser, main

        build_parser()
        helps = {{}}
        for argv in [["--help"]] + [[name, "--help"] for name in {list(COMMANDS)!r}]:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    main(argv)
                except SystemExit as exc:
                    status = exc.code
            helps[" ".join(argv)] = [status, len(out.getvalue())]
        heavy = [name for name in ("torch", "fastapi", "uvicorn") if name in sys.modules]
        print(json.dumps({{"heavy": heavy, "helps": helps}}))
    """)
    assert report["heavy"] == []  # nor the server's FastAPI and uvicorn
    assert len(report["helps"]) == len(COMMANDS) + 1
    for argv, (status, length) in report["helps"].items():
        assert status == 0 and length > 200, argv  # each printed a real help text


def test_the_package_loads_its_public_names_on_first_use():
    report = run_python("""
        import json, sys
        import mini_transformer

        after_import = "torch" in sys.modules
        listed = set(mini_transformer.__all__) <= set(dir(mini_transformer))
        from mini_transformer import Transformer, UserError, generate

        try:
            mini_transformer.no_such_name
            missing = "no error"
        except AttributeError as exc:
            missing = str(exc)
        print(json.dumps({"after_import": after_import, "listed": listed, "torch_after_use": "torch" in sys.modules,
                          "transformer": Transformer.__module__, "user_error": UserError.__module__,
                          "generate": generate.__module__, "missing": missing}))
    """)
    assert report["after_import"] is False
    assert report["listed"] is True
    assert report["torch_after_use"] is True
    assert report["transformer"] == "mini_transformer.model"
    assert report["user_error"] == "mini_transformer.errors"
    assert report["generate"].startswith("mini_transformer.generation")
    assert "no_such_name" in report["missing"]


def test_every_public_name_resolves():
    import mini_transformer

    for name in mini_transformer.__all__:
        assert getattr(mini_transformer, name) is not None, name
