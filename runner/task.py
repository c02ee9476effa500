"""One wrapper for every task: the record first, one outcome, signals, W&B and the printed summary.

    with task_run(cfg, "eval", print_summary=print_summary) as run:
        check_eval_config(cfg)            # config errors first: no data read, no weight allocated
        run.start_logger()
        ...
        run.results.update(metrics=metrics)
    return run.results.data

results.json is written before the body runs and rewritten with the outcome whatever happens:
  ok            the body returned
  interrupted   Ctrl-C or SIGTERM (SIGTERM raises `Interrupted` anywhere outside the training loop, which
                has its own step-boundary handler); a one-line message, no traceback, and run.py exits with
                the shell's code for the signal (`exit_code()`: 130 after Ctrl-C, 143 after SIGTERM)
  oom / failed  any other exception, recorded and then re-raised (Hydra prints it; run.py prints an error
                of the checks inside `config_checks()` in one line, without a traceback)
Then the W&B run gets the status, the metrics and any benchmark tables, and finishes; the task's own
summary is printed last. A Ctrl-C or SIGTERM during that closing section is held until it is done (a record
half-written would say `running` for ever), then acknowledged in one line; in a sweep it stops the sweep.
"""
import re
import signal
from contextlib import contextmanager

from omegaconf import DictConfig

from runner.exitcode import note_stop
from runner.tracking import Results, is_oom, start_logger


class Interrupted(BaseException):
    """Raised at a step boundary after SIGTERM or Ctrl-C (a checkpoint has been saved), or at once on SIGTERM
    outside the training loop. A BaseException, like KeyboardInterrupt: code that carries on past an ordinary
    error (a benchmark point, a data worker) must not swallow a stop."""

    def __init__(self, message: str, stop: "StopSignal | None" = None, signal_name: str | None = None):
        super().__init__(message)
        self.stop = stop
        self.signal_name = signal_name or (stop.received if stop is not None else None)


@contextmanager
def config_checks():
    """Marks the ValueErrors (and constructors' TypeErrors) of the config checks inside as config errors, which
    run.py prints in one line with the key to change, without a traceback (HYDRA_FULL_ERROR=1 shows it). The
    error keeps its type: results.json and the compare report name it as before."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError) as err:  # FileNotFoundError: a path the config names
        err.config_error = True
        raise


def is_config_error(err: BaseException) -> bool:
    return getattr(err, "config_error", False)


def config_key(err: BaseException) -> str | None:
    """The first `key=` a config error's message names (the checks name the offending key first)."""
    found = re.search(r"([A-Za-z_][\w/]*(?:\.\w+)*)=", str(err))
    return found.group(1) if found else None


class StopSignal:
    """SIGTERM / SIGINT set a flag; the training loop checks it between steps, so nothing is left half-done.

    In a submitit job the cluster's time-limit/preemption signal (USR2) is caught too; after the
    checkpoint, `forward()` hands it to submitit's own handler, which requeues the job.
    """

    def __init__(self, extra=()):
        self.received = None
        self._signals = (signal.SIGTERM, signal.SIGINT, *extra)
        self._previous = {}

    def __enter__(self):
        for sig in self._signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (some launchers): signals stay as they were
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def forward(self):
        """Call the handler that was installed before ours for the received signal, if it was a Python one."""
        sig = signal.Signals[self.received] if self.received else None
        handler = self._previous.get(sig)
        if callable(handler) and sig not in (signal.SIGINT, signal.SIGTERM):
            handler(sig, None)


class DeferredSignals:
    """SIGINT and SIGTERM noted, not raised, inside the block (the task wrapper's closing section); `received`
    names the first one that came ("Ctrl-C" or "SIGTERM"), or is None."""

    def __init__(self):
        self.received, self._previous = None, {}

    def _note(self, signum, frame):
        self.received = self.received or ("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._note)
            except ValueError:  # not the main thread: signals stay as they were
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class RankResults(Results):
    """Ranks other than 0 keep the record in memory; rank 0 alone writes results.json."""

    def write(self):
        pass


class TaskRun:
    """What the body of `task_run` works with: the record, the logger once started, clean-ups."""

    def __init__(self, cfg: DictConfig, results: Results, is_main: bool):
        self.cfg, self.results, self.is_main = cfg, results, is_main
        self.logger = None
        self.stop: StopSignal | None = None  # a signal to hand on after the record (submitit's requeue)
        self.interrupt_hint = None  # callable(err) -> message, for an interruption outside a checkpoint
        self._closers = []

    def start_logger(self):
        """W&B (logger=wandb), after the config checks: a bad config must not open a W&B run."""
        if self.is_main:
            self.logger = start_logger(self.cfg, self.results)
        return self.logger

    def on_close(self, close):
        """close(status) runs after the outcome is recorded (process groups, files)."""
        self._closers.append(close)


def _sigterm_raises_interrupted():
    """Make SIGTERM raise Interrupted (as Ctrl-C raises KeyboardInterrupt), so that a run stopped anywhere
    records `interrupted`; the training loop installs its own, step-boundary handler inside."""
    def handle(signum, frame):
        raise Interrupted("SIGTERM", signal_name="SIGTERM")
    try:
        return signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread
        return None


def log_bench(logger, bench: dict | None) -> None:
    """The benchmark's tables and headline numbers to W&B (task=bench, and train.bench after training)."""
    if not bench:
        return
    for key in ("train", "prefill", "decode", "kernels"):
        logger.log_table(f"bench/{key}", bench.get(key) or [])
    logger.summary({f"bench/{k}": v for k, v in bench.items() if isinstance(v, (int, float))})


@contextmanager
def task_run(cfg: DictConfig, task: str, print_summary=None, is_main: bool = True, out_dir=None):
    results = (Results if is_main else RankResults)(cfg, out_dir, task=task)  # first: no outcome unrecorded
    run = TaskRun(cfg, results, is_main)
    previous_sigterm = _sigterm_raises_interrupted()
    status, error = "failed", None
    try:
        yield run
        status = "ok"
    except (Interrupted, KeyboardInterrupt) as err:
        status, run.stop = "interrupted", getattr(err, "stop", None)
        if run.stop is not None:  # stopped at a step boundary: the message names the checkpoint
            message = str(err)
        elif run.interrupt_hint is not None:
            message = run.interrupt_hint(err)
        else:
            message = f"{str(err) or 'Ctrl-C'}: {task} stopped before it finished"
        results.data["error"] = {"type": "Interrupted", "message": message}
        note_stop("SIGINT" if isinstance(err, KeyboardInterrupt) else err.signal_name)
        if is_main:
            print(f"\n{message}")
    except BaseException as err:
        status, error = ("oom" if is_oom(err) else "failed"), err
        raise
    finally:
        with DeferredSignals() as late:  # a stop now waits until the record, W&B and the summary are done
            results.finish(status, error)
            for close in run._closers:
                close(status)
            if run.logger is not None:
                log_bench(run.logger, results.data.get("bench"))
                run.logger.summary({"status": status, **results.data["metrics"]})
                run.logger.finish(status)
            if is_main and print_summary is not None:
                print_summary(results.data)
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if late.received and status != "interrupted":
            if is_main:
                print(f"\n{late.received} after {task} finished: its results are recorded (status {status})")
            if error is not None:  # the failure is recorded; in a sweep the stop still stops the sweep
                _stop_sweep(None)
    if run.stop is not None:
        run.stop.forward()  # submitit's requeue, after the checkpoint and the record
    if status == "interrupted":  # one job of an in-process sweep: the whole sweep stops (runner/sweep.py)
        _stop_sweep(str(results.path.parent))
    elif late.received:
        _stop_sweep(None)


def _stop_sweep(job_dir: str | None) -> None:
    """In an in-process sweep, raise SweepInterrupted so that no further job starts (job_dir: the job that was
    interrupted, None when the stop came after the job had finished)."""
    from runner.sweep import SweepInterrupted, in_process_sweep_dir
    sweep_dir = in_process_sweep_dir()
    if sweep_dir is not None:
        raise SweepInterrupted(sweep_dir, job_dir)
