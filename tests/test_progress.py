"""mmedit.progress: bars and phases name what they do, on stderr, and say nothing when disabled; phases
show only on a terminal and go when done (a log keeps just the result or the one error line)."""
import contextlib
import time

import pytest

from mmedit.progress import phase, track


def test_phase_shows_its_name_on_a_terminal_only(capsys, monkeypatch):
    with phase("loading base-model"):
        pass
    assert capsys.readouterr() == ("", "")  # not a terminal (a pipe, a log): nothing
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: treat stderr as an interactive terminal
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    with phase("loading base-model"):
        time.sleep(0.3)  # a few refreshes (rich draws 10 per second)
    shown = capsys.readouterr()
    assert shown.out == "" and "loading base-model" in shown.err
    with pytest.raises(ValueError, match="boom"):
        with phase("writing out"):
            raise ValueError("boom")


def test_disabled_is_silent(capsys, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    with phase("loading", enabled=False):
        pass
    assert list(track([1, 2], "counting", enabled=False)) == [1, 2]
    assert capsys.readouterr() == ("", "")


def test_merge_revert_diff_name_their_phases(tmp_path, monkeypatch):
    import mmedit.checkpoint
    from mmedit import zoo
    from mmedit.checkpoint import diff, merge, revert
    from mmedit.delta import Delta
    from mmedit.loading import load

    names = []

    @contextlib.contextmanager
    def record(description, enabled=True):
        if enabled:
            names.append(description)
        yield

    monkeypatch.setattr(mmedit.checkpoint, "phase", record)
    monkeypatch.chdir(tmp_path)
    zoo.write("llava", "base")
    name = "model.multi_modal_projector.linear_1.weight"
    weight = dict(load("base", device="cpu")[0].named_parameters())[name].detach()
    Delta.from_changes({name: (weight, weight * 2)}).save("d.safetensors")
    merge("base", ["d.safetensors"], "m")
    assert names == ["loading base", "applying d.safetensors", "writing m"]
    names.clear()
    revert("m", ["d.safetensors"], "r")
    assert names == ["loading m", "reverting d.safetensors", "writing r"]
    names.clear()
    diff("base", "m")
    assert names == ["loading base", "loading m", "comparing the weights"]
    names.clear()
    merge("base", ["d.safetensors"], "quiet", progress=False)
    assert names == []
