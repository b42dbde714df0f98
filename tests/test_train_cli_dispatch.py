"""`lowbit <cmd>` dispatch: a subcommand whose module is absent fails with one clear line, exit 2."""
import importlib.util

import pytest

from lowbit.cli import COMMANDS, main


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_missing_subcommand_module_is_a_clear_error(cmd, capsys):
    module = COMMANDS[cmd][0]
    try:
        present = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        present = False
    if present:
        pytest.skip(f"{module} is installed")
    assert main([cmd]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and module in err[0]


def test_unknown_command_prints_usage(capsys):
    assert main(["nope"]) == 2
    assert "usage: lowbit" in capsys.readouterr().err
