"""Ctrl-C and SIGTERM held over a C library's section (``saelab.interrupts``), and the CLI's reading of an error
that an interrupt caused inside a library."""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import h5py
import numpy as np
import pytest

from saelab import interrupts
from saelab.analysis.features import build
from saelab.fs import atomic_file, temp_name


@pytest.mark.parametrize("signum", interrupts.HELD)
def test_a_held_signal_is_raised_by_check_only_once(signum):
    with interrupts.held() as h:
        os.kill(os.getpid(), signum)  # the handler runs at the next bytecode: it keeps the signal, nothing raises
        assert h.arrived == [signum]
        with pytest.raises(KeyboardInterrupt):
            h.check()
        h.check()  # raised once: a second check passes, and the section's end delivers nothing more


@pytest.mark.parametrize("signum", interrupts.HELD)
def test_a_signal_not_raised_goes_to_the_previous_handler_when_the_section_ends(signum):
    calls = []
    previous = signal.signal(signum, lambda s, frame: calls.append(s))
    try:
        with interrupts.held():
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)
            assert calls == []
        assert calls == [signum]  # the first one, once
        os.kill(os.getpid(), signum)
        assert calls == [signum, signum]  # the previous handler is back
    finally:
        signal.signal(signum, previous)


def test_a_default_sigterm_kills_the_process_once_the_section_ends():
    code = textwrap.dedent("""
        import os, signal
        from saelab import interrupts
        with interrupts.held():
            os.kill(os.getpid(), signal.SIGTERM)
            print("section done", flush=True)
        print("after", flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGTERM and r.stdout == "section done\n", (r.returncode, r.stdout, r.stderr)


def test_an_interrupt_while_h5py_builds_features_h5_is_a_keyboard_interrupt_and_no_file(tmp_path, monkeypatch):
    """The signal comes while h5py is inside a dataset's creation (outside its file callbacks): it is raised at
    the next callback as a KeyboardInterrupt, the temp file goes, nothing is at the final name."""
    real = h5py.Group.create_dataset

    def create(self, name, *a, **kw):
        if name == "b":
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, name, *a, **kw)

    monkeypatch.setattr(h5py.Group, "create_dataset", create)
    final = tmp_path / "features.h5"
    small = {"a": np.arange(3.0), "b": np.ones((4, 2)), "c": np.zeros(5)}
    with pytest.raises(KeyboardInterrupt), atomic_file(final) as tmp:
        build._write(tmp, {"n": 1}, small, {}, np.arange(4.0), ["x", "y"])
    assert not final.exists() and not temp_name(final).exists()


def test_ctrl_c_at_random_moments_of_a_features_write_is_an_interrupt_or_a_whole_file(tmp_path, capfd):
    """A Ctrl-C from another thread at a random moment of ``_write``: the write ends whole, or with a
    KeyboardInterrupt and no file; never an h5py error, never an interrupt that h5py swallowed ("Exception
    ignored in"). Without the holding, about 1 in 30 such writes ended in h5py's "driver write request failed"
    RuntimeError and 1 in 6 lost the interrupt."""
    rng = np.random.default_rng(0)
    small = {f"d{i}": rng.random((50, 8)) for i in range(40)}
    final = tmp_path / "features.h5"

    def write():
        with atomic_file(final) as tmp:
            build._write(tmp, {"n": 1}, small, {}, np.arange(4.0), ["x"] * 100)

    start = time.perf_counter()
    write()
    took = time.perf_counter() - start
    outcomes = collections.Counter()
    for delay in rng.uniform(0, took * 1.5, 200):
        final.unlink(missing_ok=True)
        timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
        try:
            timer.start()  # a delay near 0 can fire before start() returns: that too is an interrupt to catch
            write()
            outcomes["whole"] += 1
        except KeyboardInterrupt:
            outcomes["interrupted"] += 1  # before the rename (no file) or after it (the whole file)
        try:
            timer.join()
            time.sleep(0.002)  # a signal that comes after the write is raised here
        except KeyboardInterrupt:
            outcomes["after"] += 1
        assert not temp_name(final).exists()
        if final.exists():  # whole: every dataset there
            with h5py.File(final) as f:
                assert sorted(f) == sorted([*small, "hist_edges", "vocab_blob", "vocab_offsets"])
    assert outcomes["interrupted"] > 20, outcomes  # the signals did land inside writes
    assert "Exception ignored" not in capfd.readouterr().err


def test_an_error_after_an_interrupt_is_reported_as_the_interrupt(monkeypatch, capsys):
    """A library that turns the KeyboardInterrupt landing inside it into an error of its own (h5py's TypeError)
    still ends the command as Ctrl-C does: one line, exit 130."""
    import saelab.cli as cli

    def garbled(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            raise TypeError("Operation not defined for data type class") from None

    monkeypatch.setattr(cli, "build_parser", lambda: _parser(garbled))
    assert cli.main([]) == 130
    assert capsys.readouterr().err.strip() == "saelab: interrupted"

    def broken(args):
        raise TypeError("a bug")  # with no interrupt, an error is a bug: its traceback shows

    monkeypatch.setattr(cli, "build_parser", lambda: _parser(broken))
    with pytest.raises(TypeError, match="a bug"):
        cli.main([])


def _parser(func):
    p = argparse.ArgumentParser()
    p.set_defaults(func=func)
    return p
