"""results.json (always, first) and Weights & Biases (when enabled).

Every job writes `results.json` in its Hydra output directory before anything else can fail, and rewrites
it atomically as the run progresses, so a crash, an out-of-memory error or a SIGTERM never loses a run.
"""
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def output_dir() -> Path:
    """The Hydra job's output directory (falls back to the cwd outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path.cwd()


def atomic_write_json(path: Path, payload: dict) -> None:
    """Write to a temporary file in the same directory and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return str(x)


# The variant fields of a run, in the order a comparison labels runs by (earlier fields name a run first).
FAMILIES = ("preset", "norm", "norm_position", "ffn", "position", "attention", "n_heads", "n_kv_heads",
            "kernel", "window", "attention_schedule", "d_model", "n_layers", "seq_len", "optimizer", "parametrization",
            "qk_norm", "z_loss")
# The part choices among them: W&B tags and the printed summary name a run by these.
PART_FAMILIES = ("preset", "norm_position", "norm", "ffn", "position", "attention", "kernel")


def variant_fields(cfg: DictConfig) -> dict:
    """The variant choices as flat fields, the columns a comparison groups by."""
    choices = {}
    try:
        from hydra.core.hydra_config import HydraConfig
        choices = dict(HydraConfig.get().runtime.choices)
    except Exception:
        pass
    m = cfg.model
    attn = m.get("attention", {}) or {}
    schedule = m.get("attention_schedule")
    target = lambda node: (node or {}).get("_target_", "").rsplit(".", 1)[-1] if node else None
    return {
        "preset": choices.get("model"),
        "norm": choices.get("model/norm") or target(m.get("norm")),
        "norm_position": m.get("norm_position"),
        "ffn": choices.get("model/ffn") or target(m.get("ffn")),
        "position": choices.get("model/position") or target(m.get("position")),
        "attention": choices.get("model/attention") or target(attn),
        "n_heads": m.get("n_heads"),
        "n_kv_heads": attn.get("n_kv_heads") or m.get("n_heads"),  # null: MHA
        "kernel": attn.get("kernel"),
        "window": attn.get("window"),
        "attention_schedule": None if schedule is None else [
            target(p) + (f"({p.get('stride', p.get('window'))})" if p.get("stride", p.get("window")) else "")
            for p in schedule],
        "d_model": m.get("d_model"),
        "n_layers": m.get("n_layers"),
        "seq_len": cfg.get("data", {}).get("seq_len"),
        # how it is trained, as swappable parts (runner/optim.py, variants/mup.py)
        "optimizer": choices.get("train/optimizer") or target((cfg.get("train") or {}).get("optimizer")),
        "parametrization": m.get("parametrization"),
        **stability_fields(m, cfg.get("train") or {}),
        "seed": cfg.get("train", {}).get("seed"),
    }


def stability_fields(model_cfg, train_cfg) -> dict:
    """The stability remedies a run may add (QK-norm, z-loss), as variant fields; read from a results.json's
    config too, for runs recorded before these were fields."""
    return {"qk_norm": bool(((model_cfg or {}).get("attention") or {}).get("qk_norm") or False),
            "z_loss": float((train_cfg or {}).get("z_loss") or 0.0)}


def machine_load() -> dict:
    """The 1-minute load average and the CPU threads this process computes with: timings taken while other work
    competes for the cores are slower than the machine's own (recorded beside every timing)."""
    import torch
    return {"cpu_load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "cpu_threads": torch.get_num_threads() or os.cpu_count()}


def busy_machine_warning(record: dict) -> str | None:
    """One line when the load average exceeded the cores in use while `record` (a run, or its bench section) was
    timed; None otherwise or when unknown."""
    load, cores = record.get("cpu_load_average"), record.get("cpu_threads") or os.cpu_count()
    if load is None or not cores or load <= cores:
        return None
    return (f"warning: busy machine (load average {load:.1f} on {cores} cores in use): the timings are slower "
            f"than this machine's own")


def environment() -> dict:
    import torch
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "datasets", "tokenizers", "wandb", "hydra"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
        "versions": versions,
        "argv": sys.argv,
    }


class Results:
    """The run's record: results.json, rewritten atomically whenever it changes."""

    def __init__(self, cfg: DictConfig, out_dir: Path | None = None, task: str | None = None):
        self.path = Path(out_dir or output_dir()) / "results.json"
        self.data = {
            "status": "running",
            "task": task or cfg.get("task"),
            "variant": variant_fields(cfg),
            "params": None,
            "metrics": {},
            "curves": {"train": [], "val": []},
            "bench": None,
            "error": None,
            "config": OmegaConf.to_container(cfg, resolve=False),
            "output_dir": str(self.path.parent),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "finished_at": None,
            **environment(),
        }
        try:
            self.data["config"] = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # an unresolvable interpolation is itself the error worth recording
            pass
        self.write()

    def update(self, **fields):
        self.data.update(fields)
        self.write()

    def finish(self, status: str, error: BaseException | None = None):
        self.data["status"] = status
        self.data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if error is not None:
            self.data["error"] = {"type": type(error).__name__, "message": str(error)}
            if getattr(error, "config_error", False):  # the run never started: task=compare lists it apart
                self.data["error"]["config_error"] = True
        self.write()

    def write(self):
        atomic_write_json(self.path, self.data)


def is_oom(error: BaseException) -> bool:
    import torch
    message = str(error).lower()  # CUDA says "out of memory"; the CPU allocator "can't allocate memory"
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or "can't allocate memory" in message


def sweep_group(cfg: DictConfig) -> str | None:
    """Runs of one Hydra multirun share a W&B group: the sweep directory's path below `outputs/`."""
    if cfg.get("logger", {}).get("group"):
        return cfg.logger.group
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return sweep_group_name(hc.sweep.dir)
    except Exception:
        pass
    return None


def sweep_group_name(sweep_dir) -> str:
    """A multirun's name in W&B and in the compare report: its directory's date and time."""
    return "sweep-" + "_".join(Path(sweep_dir).parts[-2:])


class WandbLogger:
    """Thin wrapper over wandb: offline when there is no API key, never fatal to the run."""

    def __init__(self, cfg: DictConfig, results: Results):
        import wandb
        self.wandb = wandb
        lc = cfg.logger
        mode = lc.get("mode", "auto")
        if mode == "auto":
            has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb_key()
            mode = "online" if has_key and os.environ.get("WANDB_MODE") != "offline" else "offline"
        variant = results.data["variant"]
        tags = [f"{k}={variant[k]}" for k in PART_FAMILIES if variant.get(k)]
        tags += list(lc.get("tags", []) or [])
        run_dir = Path(lc.get("dir") or results.path.parent)
        kwargs = dict(project=lc.project, entity=lc.get("entity"), group=sweep_group(cfg),
                      name=run_dir.name, dir=str(run_dir), tags=tags[:64], reinit="finish_previous",
                      config={**OmegaConf.to_container(cfg, resolve=True), "variant": variant})
        os.environ.setdefault("WANDB_SILENT", "true")  # its banner and sync hints: one line below instead
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as err:  # no network, bad key: keep the run and log offline
            log.warning(f"W&B {mode} init failed ({err}); logging offline instead")
            self.run = wandb.init(mode="offline", **kwargs)
        self.mode = mode
        if mode == "offline":
            log.info(f"W&B offline run {Path(self.run.dir).parent} (upload: wandb sync {Path(self.run.dir).parent})")
        else:
            log.info(f"W&B run {self.run.url}")
        self.run.define_metric("step")
        for name in ("train/*", "val/*", "perf/*"):
            self.run.define_metric(name, step_metric="step")
        self.run.define_metric("val/loss", step_metric="step", summary="min")
        self.run.define_metric("val/ppl", step_metric="step", summary="min")
        results.update(wandb={"mode": mode, "dir": str(self.run.dir), "id": self.run.id,
                              "group": kwargs["group"], "project": lc.project})

    def log(self, metrics: dict, step: int):
        self.run.log({"step": step, **metrics})

    def log_table(self, key: str, rows: list[dict]):
        if rows:
            columns = sorted({k for row in rows for k in row})
            self.run.log({key: self.wandb.Table(columns=columns, data=[[_cell(r.get(c)) for c in columns]
                                                                       for r in rows])})

    def summary(self, values: dict):
        for k, v in values.items():
            self.run.summary[k] = v

    def finish(self, status: str):
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "ok" else 1)


def _cell(v):
    return v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v, default=str)


def _netrc_has_wandb_key() -> bool:
    try:
        import netrc
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except Exception:
        return False


def start_logger(cfg: DictConfig, results: Results):
    """A WandbLogger for logger=wandb, None for logger=none."""
    if cfg.get("logger", {}).get("name", "none") != "wandb" or cfg.logger.get("mode") == "disabled":
        return None
    return WandbLogger(cfg, results)
