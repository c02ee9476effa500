"""The exit status of a process whose task or sweep a signal stopped: 128 + the signal's number (130 after
Ctrl-C, 143 after SIGTERM), as a shell reports a killed command, so scripts and schedulers tell an
interrupted run from a finished one (0). Light: run.py reads it after the job.
"""
import signal

_exit = {"code": None}  # set when a task or sweep is stopped by a signal


def exit_code() -> int | None:
    return _exit["code"]


def note_stop(signal_name: str | None) -> None:
    """Remember the stopping signal (a name like SIGTERM or Ctrl-C; None: SIGTERM, another rank's or job's stop)."""
    name = {"Ctrl-C": "SIGINT", None: "SIGTERM"}.get(signal_name, signal_name)
    _exit["code"] = 128 + signal.Signals[name].value
