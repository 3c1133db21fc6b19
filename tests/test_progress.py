"""Progress output: bars on a terminal, a few plain lines with an ETA elsewhere; polling never fails the work."""

import io

import pytest

from pipeline import progress


def test_plain_lines_at_each_quarter_with_an_eta(capsys, monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: False)
    bar = progress.Progress("train-x", 100)
    for n in range(0, 101, 5):
        bar.update_to(n, f"loss {n / 100:.2f}", rate=10.0)
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["  train-x: 25/100 (25%, ETA 7s) loss 0.25", "  train-x: 50/100 (50%, ETA 5s) loss 0.50",
                     "  train-x: 75/100 (75%, ETA 2s) loss 0.75", "  train-x: 100/100 (100%) loss 1.00"]


def test_a_terminal_gets_a_bar_and_no_plain_lines(monkeypatch):
    import functools

    from tqdm import tqdm

    monkeypatch.setattr(progress, "interactive", lambda: True)
    stream = io.StringIO()
    monkeypatch.setattr(progress, "tqdm", functools.partial(tqdm, file=stream, disable=False))  # conftest: TQDM_DISABLE
    monkeypatch.setattr("builtins.print", lambda *a, **k: pytest.fail(f"plain line on a terminal: {a}"))
    bar = progress.Progress("bench", 4, unit="model")
    bar.update_to(2, "a")
    bar.update_to(4, "b")
    bar.close()
    assert "bench" in stream.getvalue() and "4/4" in stream.getvalue()


def test_poller_polls_until_the_end_and_survives_errors():
    calls = []

    def poll():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("storage hiccup")

    with progress.Poller(poll, every=0.01):
        import time

        time.sleep(0.1)
    assert len(calls) >= 2  # kept polling after the failure, and once more at the end
