"""Errors are one line by default; TL_TRACEBACK=1 shows the whole traceback, hidden causes included."""

from __future__ import annotations

import pytest

from tlpipe.errors import TRACEBACK_VARIABLE, PipelineError, stage_main


@stage_main
def failing_stage(kind: str) -> None:
    try:
        {}["weights"]  # noqa: B018 - the original error that a one-line error replaces
    except KeyError:
        if kind == "expected":
            raise PipelineError("backbones.x.weights: cannot load the weights file") from None
        raise RuntimeError("oneDNN primitive creation failed\n  at frame 12 of a long TensorFlow message") from None


def run_failing(kind: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    with pytest.raises(SystemExit) as exit_info:
        failing_stage(kind)
    assert exit_info.value.code == 1
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("kind", ["expected", "unexpected"])
def test_an_error_is_one_line_by_default(
    kind: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TRACEBACK_VARIABLE, raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    lines = run_failing(kind, capsys)
    assert len(lines) == 1, lines
    if kind == "expected":
        assert lines[0] == "error: backbones.x.weights: cannot load the weights file"
    else:
        assert lines[0].startswith("error: unexpected RuntimeError: oneDNN primitive creation failed (rerun with ")
        assert f"{TRACEBACK_VARIABLE}=1" in lines[0]


@pytest.mark.parametrize("kind", ["expected", "unexpected"])
def test_tl_traceback_shows_the_traceback_and_the_hidden_cause(
    kind: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TRACEBACK_VARIABLE, "1")
    monkeypatch.delenv("DVC_STAGE", raising=False)
    text = "\n".join(run_failing(kind, capsys))
    assert "Traceback (most recent call last)" in text and "failing_stage" in text
    assert "KeyError: 'weights'" in text  # the cause that `from None` hid
    assert text.splitlines()[-1].startswith("error: ")
