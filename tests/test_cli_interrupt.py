"""Ctrl+C in a long CLI command: exit code 130, a one-line message, no traceback, nothing half-written."""

import signal
import subprocess
import sys
import time


def test_keyboard_interrupt_in_a_training_command(tmp_path):
    out = tmp_path / "judge"
    proc = subprocess.Popen([sys.executable, "-m", "safedig_core", "train-judge", "--out", str(out),
                             "--steps", "100000", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a suite started in the background (cmd &) inherits SIGINT ignored: Ctrl+C as in a terminal
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(12)  # well inside the training loop
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.tmp")) and not (out / "judge.safetensors").exists()
