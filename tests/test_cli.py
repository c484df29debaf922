"""The ``iotcompress`` command's small faces: ``--version`` and the progress output (a live
line on a terminal, plain lines in a log)."""

import os
import select
import subprocess
import sys

import iotcompress as ic
from iotcompress._progress import Progress


def test_version_prints_the_package_version_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "iotcompress.cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"iotcompress {ic.__version__} (wire format v{ic.WIRE_VERSION}, SIMD {ic.simd_level()})"
    assert ic.__version__ != "0.0.0"  # the installed package's own version, not the fallback


def drive(stream, steps=50):
    bar = Progress(steps, "training", stream=stream)
    for i in range(1, steps + 1):
        bar.update(i, f"acc {i / steps:.2f}")
    bar.close("acc 1.00")


def test_progress_in_a_log_is_plain_lines(tmp_path):
    path = tmp_path / "log.txt"
    with open(path, "w") as log:
        drive(log)
    text = path.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    # the first update, a line per 10 % after it, and the closing line
    assert len(lines) == 12 and all(line.startswith("  training") for line in lines)
    assert " 1/50" in lines[0] and " 5/50" in lines[1]
    assert "50/50" in lines[-2] and "done in" in lines[-1]


def test_progress_on_a_terminal_is_one_live_line():
    leader, follower = os.openpty()  # a real terminal device: isatty() is true
    try:
        with os.fdopen(follower, "w", closefd=False) as tty:
            assert tty.isatty()
            bar = Progress(3, "training", stream=tty)
            for i in (1, 2, 3):
                bar._last_draw = 0.0  # redraw every update: the bar limits itself to 10 draws a second
                bar.update(i)
            bar.close()
        out = b""
        while select.select([leader], [], [], 1.0)[0]:  # a pty hands the writes back one by one
            out += os.read(leader, 65536)
        out = out.decode()
    finally:
        os.close(leader)
        os.close(follower)
    # each redraw returns to the start of the same line; one newline ends the bar, one the summary
    assert out.count("\r  training") == 3 and out.replace("\r\n", "\n").count("\n") == 2
    assert "3/3" in out and "done in" in out
