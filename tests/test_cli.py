"""The `longvu` command line: the installed console script, `python -m train`, the registry."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from train import cli


def _console_script() -> str:
    """The `longvu` script installed next to the running interpreter (the project's venv)."""
    candidate = Path(sys.executable).parent / "longvu"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("longvu")
    if found is None:
        pytest.fail("the `longvu` console script is not installed; run scripts/setup_env.sh")
    return found


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def _listed_commands(help_text: str) -> set[str]:
    """Subcommand names: the lines indented by four spaces under `COMMAND` in the help text."""
    return set(re.findall(r"^ {4}([a-z][\w-]*)", help_text, flags=re.MULTILINE))


def test_console_script_help_lists_subcommands():
    result = _run(_console_script(), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: longvu")
    (subparsers,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    registered = set(subparsers.choices)
    assert "version" in registered
    assert len(registered) >= len(cli.SUBCOMMAND_MODULES) + 1  # each module adds a subcommand
    assert _listed_commands(result.stdout) == registered


def test_console_script_version():
    result = _run(_console_script(), "version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"longvu-train {metadata.version('longvu-train')}"


def test_python_dash_m_train():
    result = _run(sys.executable, "-m", "train", "version", "--all")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("longvu-train ")
    assert any(line.startswith("torch ") for line in lines)
    assert any(line.startswith("transformers 5.") for line in lines)


def test_missing_or_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_registry_adds_module_subcommands(tmp_path, monkeypatch, capsys):
    (tmp_path / "longvu_cli_fake.py").write_text(
        textwrap.dedent(
            """
            def _run(args):
                print(f"fake ran with n={args.n}")
                return 3

            def add_parser(subparsers):
                parser = subparsers.add_parser("fake", help="a test subcommand")
                parser.add_argument("--n", type=int, default=1)
                parser.set_defaults(func=_run)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ["longvu_cli_fake"])

    assert cli.main(["fake", "--n", "7"]) == 3
    assert capsys.readouterr().out == "fake ran with n=7\n"

    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert _listed_commands(out) == {"fake", "version"}
    assert "a test subcommand" in out


def test_registry_does_not_hide_broken_modules(monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ["train.no_such_subcommand_module"])
    with pytest.raises(ModuleNotFoundError, match="no_such_subcommand_module"):
        cli.main(["version"])
