"""``edgesplit planner [flags] SUBCOMMAND [flags]``: flags before the subcommand go to that subcommand,
and ``edgesplit planner [flags]`` with no subcommand is still ``planner serve`` (review)."""

from __future__ import annotations

import pytest

from runtime.cli.main import build_parser, main


def test_flags_before_print_config_are_print_configs(capsys, tmp_path):
    db = str(tmp_path / "p.sqlite")
    assert main(["planner", "--db", db, "--no-include-return", "print-config"]) == 0
    out = capsys.readouterr().out
    assert f'db = "{db}"' in out and "include_return = false" in out


@pytest.mark.parametrize("argv, command, dest, value", [
    (["--db", "x.sqlite", "print-config"], "print-config", "db", "x.sqlite"),
    (["--db=x.sqlite", "print-config"], "print-config", "db", "x.sqlite"),
    (["--db", "query", "print-config"], "print-config", "db", "query"),  # a flag's value that names a subcommand
    (["--no-include-return", "print-config"], "print-config", "include_return", False),  # a flag without a value
    (["--log-level", "DEBUG", "--planner", "h:1", "agents"], "agents", "planner", "h:1"),
    (["--listen", "127.0.0.1:0", "--db", "x.sqlite"], "serve", "db", "x.sqlite"),  # no subcommand: serve
])
def test_flags_then_subcommand_is_subcommand_then_flags(argv, command, dest, value):
    parser = build_parser()
    first = parser.parse_args(["planner", *argv])
    words = [w for w in argv if w != command]
    assert vars(first) == vars(parser.parse_args(["planner", command, *words]))
    assert first.planner_command == command and getattr(first, dest) == value


def test_a_word_that_is_no_subcommand_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["planner", "--db", "x.sqlite", "nonsense"])
    assert e.value.code == 2 and "unrecognized arguments: nonsense" in capsys.readouterr().err
