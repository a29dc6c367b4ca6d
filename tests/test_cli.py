"""The ``tformer`` command: every subcommand listed on one line, each importable subcommand's
--help showing all of its module's options, missing ones refused in one line, and nothing
heavy imported for ``tformer --help``.

The subcommand list comes from tformer.cli.COMMANDS, so a command module that lands later is
tested here without editing this file.
"""

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tformer import cli

from train_helpers import tiny_config


def _module_exists(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


PRESENT = [name for name, command in cli.COMMANDS.items() if _module_exists(command.module)]
MISSING = [name for name in cli.COMMANDS if name not in PRESENT]


def test_the_commands_every_engineer_agreed_on_are_wired():
    assert {"train", "sample", "classify", "env", "ablate", "visualize", "embed", "transcribe"} <= set(cli.COMMANDS)
    assert {"train", "sample", "classify", "env"} <= set(PRESENT)


def test_top_level_help_lists_every_command_on_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for name, command in cli.COMMANDS.items():
        assert any(line.split()[:1] == [name] and line.rstrip().endswith(command.summary) for line in lines), \
            f"no line '{name}  {command.summary}' in:\n" + "\n".join(lines)


@pytest.mark.parametrize("name", PRESENT)
def test_command_help_shows_every_option_of_its_module(name, capsys):
    module = importlib.import_module(cli.COMMANDS[name].module)
    parser = module.build_parser(f"tformer {name}")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert shown == parser.format_help()
    options = [o for action in parser._actions if action.help != "==SUPPRESS==" for o in action.option_strings]
    assert options and all(option in shown for option in options)


def test_command_whose_module_is_missing_fails_in_one_line(capsys, monkeypatch):
    # Every shipped command module exists; a command whose module an install lacks (a newer
    # tformer's command, an uninstalled plugin) must still fail in one line, exit 2.
    monkeypatch.setitem(cli.COMMANDS, "future", cli.Command("tformer.no_such_command_module", "not here"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["future", "--help"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: 'tformer future' is not available")
    assert "tformer.no_such_command_module" in err


def test_every_shipped_command_module_exists():
    assert not MISSING, f"commands without their module: {MISSING}"


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["trian"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


def test_arguments_reach_the_command_unchanged(monkeypatch):
    seen = {}
    fake = type(sys)("fake_command")
    fake.main = lambda argv, prog: seen.update(argv=argv, prog=prog) or 3
    monkeypatch.setitem(sys.modules, "tformer.cli.classify", fake)
    argv = ["--checkpoint", "runs/x", "a review", "--", "-dashed text", "--help"]
    assert cli.main(["classify", *argv]) == 3
    assert seen == {"argv": argv, "prog": "tformer classify"}


def test_every_command_is_one_module_of_the_cli_package():
    assert all(command.module == f"tformer.cli.{name}" for name, command in cli.COMMANDS.items())
    assert {"checkpoint", "env"} <= set(cli.COMMANDS)


@pytest.mark.parametrize("name", PRESENT)
def test_usage_line_names_the_command_as_typed(name, capsys):
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    assert capsys.readouterr().out.startswith(f"usage: tformer {name} ")
    with pytest.raises(SystemExit):
        cli.main([name, "--help"], prog="python -m tformer")
    assert capsys.readouterr().out.startswith(f"usage: python -m tformer {name} ")


def test_python_m_tformer_is_the_tformer_command():
    result = subprocess.run([sys.executable, "-m", "tformer", "checkpoint", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).parent)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m tformer checkpoint ")
    assert "verify" in result.stdout


def test_help_does_not_import_torch_and_the_console_script_is_installed():
    probe = ("import sys\nfrom tformer import cli\n"
             "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.splitlines()[-1] == "False"
    script = Path(sys.executable).with_name("tformer")
    assert script.is_file(), f"the console script is missing next to {sys.executable}; reinstall tformer"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "transcribe" in result.stdout


def test_tformer_train_runs_a_tiny_job(tmp_path):
    config = tiny_config(tmp_path, run={"steps": 2})
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))
    assert cli.main(["train", "--config", str(path), "--set", "run.export=true"]) == 0
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]


def test_one_function_finds_export_folders(tmp_path):
    """Commands and training.init_from accept the same folders: an export, a run or checkpoint
    folder holding export/, or a run whose newest complete checkpoint holds one."""
    from tformer.models.pretrained import CONFIG_NAME, WEIGHTS_NAME, find_export

    def export_at(folder):
        folder.mkdir(parents=True)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            (folder / name).write_text("{}")
        return folder

    run = tmp_path / "run"
    for step, complete in ((2, True), (10, True), (11, False)):
        export_at(run / "checkpoints" / f"step_{step}" / "export")
        if complete:
            (run / "checkpoints" / f"step_{step}" / "COMPLETE").write_text("{}")
    assert find_export(run) == run / "checkpoints" / "step_10" / "export"  # newest complete, by number
    assert find_export(run / "checkpoints" / "step_2") == run / "checkpoints" / "step_2" / "export"
    export_at(run / "export")
    assert find_export(run) == find_export(run / "export") == run / "export"
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / WEIGHTS_NAME).write_text("")
    assert find_export(tmp_path / "bare", argument="training.init_from", need_config=False) == tmp_path / "bare"
    with pytest.raises(FileNotFoundError, match=r"argument '--checkpoint' = .*bare.* holds no config.json"):
        find_export(tmp_path / "bare")
    # No other module keeps its own finder.
    package = Path(cli.__file__).resolve().parent.parent
    finders = [str(path.relative_to(package)) for path in package.rglob("*.py")
               if any(f"def {name}(" in path.read_text() for name in ("find_export", "resolve_export",
                                                                       "resolve_export_dir"))]
    assert finders == ["models/pretrained.py"]
