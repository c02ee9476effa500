"""Run run.py with one function held open until the test has sent its signal, so that a signal lands inside
a phase by construction, never by the clock.

    python tests/hold_phase.py MODULE:FUNCTION HELD_FILE SENT_FILE [after] -- run.py overrides...

The first call of MODULE.FUNCTION (before it runs, or with `after` once it has returned) writes HELD_FILE
and waits until SENT_FILE exists: the test waits for HELD_FILE, sends the signal, then writes SENT_FILE. A
signal the process acts on at once raises inside the wait, that is inside the phase; one the process defers
(the task wrapper's closing section) has been delivered by the time the wait ends. No SENT_FILE within 120 s
is an error, so a test cannot pass without its signal.
"""
import functools
import importlib
import runpy
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def hold(held: Path, sent: Path):
    held.write_text("held")
    deadline = time.monotonic() + 120
    while not sent.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"hold_phase: no signal within 120 s ({sent} never appeared)")
        time.sleep(0.01)
    time.sleep(0.05)  # the signal was sent before SENT_FILE: its handler has run by the end of this sleep


def held_once(fn, held: Path, sent: Path, after: bool):
    state = {"done": False}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = not state["done"]
        state["done"] = True
        if first and not after:
            hold(held, sent)
        out = fn(*args, **kwargs)
        if first and after:
            hold(held, sent)
        return out
    return wrapper


def main(argv):
    # Ctrl-C as a terminal delivers it, whatever this process inherited (a SIGINT ignored by the parent, e.g.
    # a job started in the background, stays ignored across exec and would make the test meaningless)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    split = argv.index("--")
    target, held, sent, *flags = argv[:split]
    module_name, _, attr = target.partition(":")
    owner_name, _, fn_name = attr.rpartition(".")
    module = importlib.import_module(module_name)
    owner = functools.reduce(getattr, owner_name.split("."), module) if owner_name else module
    setattr(owner, fn_name, held_once(getattr(owner, fn_name), Path(held), Path(sent), "after" in flags))
    sys.path.insert(0, str(ROOT))
    sys.argv = [str(ROOT / "run.py"), *argv[split + 1:]]
    runpy.run_path(str(ROOT / "run.py"), run_name="__main__")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1:])


class HeldRun:
    """A test's side: start run.py under this holder, wait until the phase is held, signal it.

        held = HeldRun(tmp_path, "runner.generate:sample_next", [*TINY, "task=generate", ...])
        held.wait_held()
        held.signal(signal.SIGINT)         # inside the phase, by construction
        proc, stdout, stderr = held.finish()
    """

    def __init__(self, cwd: Path, target: str, run_args, after: bool = False, name: str = "run", env=None):
        import os
        import subprocess
        self.held, self.sent = Path(cwd) / f"{name}.held", Path(cwd) / f"{name}.sent"
        cmd = [sys.executable, str(Path(__file__).resolve()), target, str(self.held), str(self.sent),
               *(["after"] if after else []), "--", *run_args]
        self.target = target
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "WANDB_SILENT": "true", **(env or {})})

    def wait_held(self, timeout: float = 240):
        deadline = time.monotonic() + timeout
        while not self.held.exists() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.held.exists():
            self.proc.kill()
            stdout, stderr = self.proc.communicate()
            raise AssertionError(f"{self.target} was never reached:\n{stdout[-2000:]}\n{stderr[-3000:]}")

    def signal(self, sig):
        self.proc.send_signal(sig)
        self.sent.write_text("sent")

    def finish(self, timeout: float = 240):
        stdout, stderr = self.proc.communicate(timeout=timeout)
        return self.proc, stdout, stderr
