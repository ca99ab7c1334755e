"""README's tour runs as written, in order, and then every command's `--help` example runs as written too
(in the folder the tour filled); every command has an example. Only `mmedit demo`'s own examples are left to
tests/test_demo.py (minutes)."""
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mmedit.cli.main import app

README = Path(__file__).resolve().parents[1] / "README.md"
# The order examples run in: each may use what the tour and the commands before it wrote.
ORDER = ["data synth", "data show", "zoo", "trace", "plugins", "apply", "sweep", "paths find", "paths show", "eval",
         "attack", "report", "sequential", "merge", "revert", "diff", "inspect", "export", "plan", "version"]
LEFT_TO_THEIR_OWN_TESTS = {"demo"}


def tour() -> list[list[str]]:
    """The `mmedit ...` commands of README's tour block (continuation lines joined, comments dropped)."""
    text = README.read_text(encoding="utf-8").split("## A tour of the command line", 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert words[0] == "mmedit", line
            commands.append(words[1:])
    return commands


def examples() -> dict[str, list[list[str]]]:
    """Command path ("paths find") -> the `Example: mmedit ...` lines of its help, as argument lists."""
    found = {}

    def walk(command, path):
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, path + [name])
            return
        lines = re.findall(r"^\s*Example: mmedit (.+)$", command.help or "", flags=re.M)
        found[" ".join(path)] = [shlex.split(line) for line in lines]

    walk(typer.main.get_command(app), [])
    return found


def run(arguments: list[str]) -> None:
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, f"mmedit {shlex.join(arguments)}\n{result.output}"


def test_every_command_has_an_example_and_the_order_knows_it():
    found = examples()
    assert set(found) - LEFT_TO_THEIR_OWN_TESTS == set(ORDER)
    assert all(found[name] for name in found), [name for name in found if not found[name]]


def test_readme_tour_then_every_help_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MMEDIT_CACHE", str(tmp_path / "cache"))
    for arguments in tour():
        run(arguments)
    assert (tmp_path / "tiny-again").is_dir() and (tmp_path / "forgot.safetensors").is_file()
    from mmedit.delta import Delta
    from mmedit.plugins import get

    preset = get("mmunlearner").presets["embedded"]
    config = Delta.load(tmp_path / "mmu.safetensors").provenance["config"]
    assert {key: config[key] for key in preset} == dict(preset)  # --preset embedded reached the plugin
    found = examples()
    for name in ORDER:
        for arguments in found[name]:
            if arguments not in tour():  # those ran above
                run(arguments)
    assert (tmp_path / "mip.json").is_file() and (tmp_path / "tiny-again-mip").is_dir()


def test_apply_preset_is_the_plugins_named_options_and_a_wrong_name_is_one_line(tmp_path):
    from mmedit.cli.apply import preset_options
    from mmedit.plugins import get

    assert preset_options(get("mmunlearner"), "embedded") == dict(get("mmunlearner").presets["embedded"])
    assert preset_options(get("mmunlearner"), None) == {}
    result = CliRunner().invoke(app, ["apply", "ga", str(tmp_path / "no-model"), "--preset", "nope", "--forget",
                                      str(tmp_path / "f.jsonl"), "--out", str(tmp_path / "d.safetensors")])
    assert result.exit_code == 1 and result.output.strip() == \
        "error: ga has no preset 'nope'; its presets: embedded, conformance"
    shown = CliRunner().invoke(app, ["plugins", "mmunlearner"], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "preset embedded: " + " ".join(f"{k}={v}" for k, v in get("mmunlearner").presets["embedded"].items()) \
        in shown.output


@pytest.mark.parametrize("name", ["zoo", "apply", "eval"])
def test_help_shows_its_examples(name):
    shown = CliRunner().invoke(app, [*name.split(), "--help"], terminal_width=200)
    assert shown.exit_code == 0 and "Example: mmedit" in shown.output


def test_config_and_set_win_over_the_preset(tmp_path, monkeypatch):
    import mmedit.cli.apply as cli_apply

    seen = {}

    def stop(plugin, model, processor, forget, retain, overrides, **kwargs):
        seen.update(overrides)
        raise cli_apply.MmeditError("stopped")

    monkeypatch.setattr("mmedit.plugins.apply_plugin", stop)
    (tmp_path / "c.json").write_text('{"lr": 0.5}')
    from mmedit import zoo
    from mmedit.bench.profiles import generate

    base = zoo.tiny("llava", root=tmp_path / "zoo")
    bench = generate(tmp_path / "bench", n_people=10, seed=0).root
    result = CliRunner().invoke(app, ["apply", "mmunlearner", str(base), "--preset", "embedded", "--config",
                                      str(tmp_path / "c.json"), "--set", "tau=7", "--forget",
                                      str(bench / "forget10.jsonl"), "--out", str(tmp_path / "d.safetensors")])
    assert result.output.strip().endswith("error: stopped"), result.output
    assert seen == {"lr": 0.5, "tau": "7"}
