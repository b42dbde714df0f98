"""`lowbit <cmd>` dispatch: every command's module exists; a subcommand whose module is absent fails
with one clear line (exit 2); a missing dependency inside a present module is not hidden."""
import importlib.util
import sys

import pytest

import lowbit.cli as cli


@pytest.mark.parametrize("cmd", sorted(cli.COMMANDS))
def test_every_command_module_exists(cmd):
    module = cli.COMMANDS[cmd][0]
    assert importlib.util.find_spec(module) is not None, module


def test_missing_subcommand_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("lowbit.no_such_package.cli", False))
    assert cli.main(["ghost"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: `lowbit ghost` is not available")
    assert "lowbit.no_such_package.cli" in err[0]


def test_missing_dependency_inside_a_module_is_not_hidden(monkeypatch, tmp_path):
    (tmp_path / "lowbit_fake_cmd.py").write_text("import some_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "fake", ("lowbit_fake_cmd", False))
    with pytest.raises(ModuleNotFoundError, match="some_dependency_that_is_not_installed"):
        cli.main(["fake"])
    sys.modules.pop("lowbit_fake_cmd", None)


def test_unknown_command_prints_usage(capsys):
    assert cli.main(["nope"]) == 2
    assert "usage: lowbit" in capsys.readouterr().err
