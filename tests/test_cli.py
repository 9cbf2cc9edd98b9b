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


def _readme_synopses() -> dict[str, str]:
    """The README's "Command line" block: command (longest known prefix) -> its synopsis line."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Command line"):]
    block = section[section.index("```text\n") + 8:]
    block = block[:block.index("```")]
    commands = cli.subcommand_parsers(cli.build_parser())
    out = {}
    for line in block.splitlines():
        name = max((c for c in commands if line == c or line.startswith(c + " ")), key=len)
        assert name not in out, f"two synopses for {name}"
        out[name] = line
    return out


def _long_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
            for o in a.option_strings if o.startswith("--")}


def test_readme_synopses_list_every_flag_of_every_command():
    """Each command with options has one README synopsis, naming exactly the flags its parser has."""
    commands = {n: p for n, p in cli.subcommand_parsers(cli.build_parser()).items() if _long_flags(p)}
    synopses = _readme_synopses()
    assert set(commands) <= set(synopses), sorted(set(commands) - set(synopses))
    for name, parser in commands.items():
        assert set(re.findall(r"--[a-z][a-z0-9-]*", synopses[name])) == _long_flags(parser), name


def test_every_help_shows_the_defaults():
    """Each option's --help line states its default ("(default: X)", or its text says what happens by
    default), except on/off flags and required options."""
    for name, parser in cli.subcommand_parsers(cli.build_parser()).items():
        formatter = parser.formatter_class(parser.prog)
        groups_required = {id(a) for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action in parser._actions:
            if (not action.option_strings or action.help == argparse.SUPPRESS or action.required
                    or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction))
                    or id(action) in groups_required):
                continue
            assert action.help, f"{name} {action.option_strings[0]}: no help"
            assert "default" in formatter._get_help_string(action), f"{name} {action.option_strings[0]}"
    help_text = cli.subcommand_parsers(cli.build_parser())["longvu quickstart"].format_help()  # as rendered
    assert "(default: outputs/quickstart)" in help_text and "(default: 6)" in help_text


def test_output_is_the_one_spelling():
    """No subcommand spells the output folder another way (--out, -out, --output-dir)."""
    for name, parser in cli.subcommand_parsers(cli.build_parser()).items():
        flags = {o for a in parser._actions for o in a.option_strings}
        assert not flags & {"--out", "--output-dir", "--output_dir", "--out-dir"}, name


def test_train_help_lists_the_tiny_families():
    from longvu.constants import TINY_FAMILIES

    help_text = cli.subcommand_parsers(cli.build_parser())["longvu train"].format_help()
    for family in TINY_FAMILIES:
        assert re.search(rf"^ +{family} +\S", help_text, flags=re.MULTILINE), family
    assert "tiny:FAMILY" in help_text and "configs/lora_tiny.yaml" in help_text
