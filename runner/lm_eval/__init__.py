"""task=lm_eval: downstream tasks through EleutherAI's lm-evaluation-harness (`pip install -e ".[eval]"`).

    python run.py task=lm_eval lm_eval.tasks=[hellaswag,lambada_openai]        # the preset, random weights
    python run.py task=lm_eval lm_eval.tasks=[arc_easy] eval.weights=outputs/runs/<run>   # a training run
    python run.py task=lm_eval lm_eval.tasks=[piqa] model=phi3 model.checkpoint=DIR       # a Phi-3 checkpoint
    python run.py task=lm_eval lm_eval.include_path=DIR lm_eval.tasks=[my_task] lm_eval.limit=20

The model is the one task=eval scores (runner.evaluate.load_eval_model); the tokenizer is a checkpoint's own
(used as lm-eval's HFLM uses it), else the project's (the trained BPE or tokenizer=hf). Hub tasks download
their data (network); a task yaml of one's own under lm_eval.include_path can read local files.
results.json: metrics.lm_eval.<task>.<metric> and <metric>_stderr; `lm_eval` holds the harness's version, the
task versions, shots and sample counts.
"""
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from runner.build import check_model_config, record_model, resolve_device
from runner.compute import autocast_dtype
from runner.evaluate import load_eval_model
from runner.task import task_run

INSTALL = 'task=lm_eval needs EleutherAI\'s lm-evaluation-harness: pip install -e ".[eval]"'


def require_harness():
    try:
        import lm_eval
    except ImportError as err:
        raise ImportError(f"{INSTALL} ({err})") from None
    return lm_eval


def task_names(cfg: DictConfig) -> list[str]:
    """The checks that need no model or data, so that a bad request fails before any work."""
    c = cfg.lm_eval
    tasks = c.get("tasks")
    tasks = tasks.split(",") if isinstance(tasks, str) else list(tasks or [])
    tasks = [str(t).strip() for t in tasks if str(t).strip()]
    if not tasks:
        raise ValueError("lm_eval.tasks is empty: name the harness tasks, e.g. lm_eval.tasks=[hellaswag,arc_easy]")
    if int(c.batch_size) < 1:
        raise ValueError(f"lm_eval.batch_size={c.batch_size} must be >= 1")
    if c.get("limit") is not None and not float(c.limit) > 0:
        raise ValueError(f"lm_eval.limit={c.limit} must be > 0 (a count, or a fraction below 1)")
    for path in _include_paths(c):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"lm_eval.include_path={path!r} is not a directory")
    check_model_config(cfg.model)
    return tasks


def _include_paths(c) -> list[str]:
    paths = c.get("include_path")
    return [] if not paths else [str(p) for p in paths] if isinstance(paths, (list, ListConfig)) else [str(paths)]


def harness_tokenizer(cfg: DictConfig):
    """A checkpoint's own tokenizer files, else tokenizer.name_or_path for a checkpoint, else the project's."""
    from runner.lm_eval.model import HarnessTokenizer

    checkpoint = cfg.model.get("checkpoint")
    if checkpoint:
        from transformers import AutoTokenizer
        from variants.hf import resolve_checkpoint
        directory = resolve_checkpoint(checkpoint)
        if any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return HarnessTokenizer.from_hf(AutoTokenizer.from_pretrained(directory), str(checkpoint))
        if cfg.tokenizer.kind != "hf":
            raise ValueError(f"model.checkpoint={checkpoint!r} has no tokenizer, and a freshly trained BPE's ids mean "
                             f"nothing to it: add tokenizer=hf tokenizer.name_or_path=<its tokenizer>")
        name = cfg.tokenizer.name_or_path
        return HarnessTokenizer.from_hf(AutoTokenizer.from_pretrained(name), str(name))
    if cfg.tokenizer.kind == "hf":
        from runner.data.tokenizer import hf_tokenizer
        return HarnessTokenizer.from_project(hf_tokenizer(cfg.tokenizer), str(cfg.tokenizer.name_or_path))
    from runner.data import build_data
    return HarnessTokenizer.from_project(build_data(cfg).tokenizer, f"{cfg.tokenizer.kind} ({cfg.data.name})")


def run_harness(lm, tasks: list[str], c: DictConfig) -> dict:
    """lm-eval's simple_evaluate on our LM; include_path adds task yamls of one's own."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    paths = _include_paths(c)
    manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):  # indexing the harness's ~15k takes ~20 s
        manager = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm_eval.tasks: {unknown} are not harness tasks (nor under lm_eval.include_path)")
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=c.get("num_fewshot"),
                           limit=c.get("limit"), bootstrap_iters=c.bootstrap_iters, log_samples=False)


def harness_metrics(out: dict) -> dict:
    """{task: {metric: value, metric_stderr: value}}. The harness keys a metric by its filter ("acc,none",
    "acc_stderr,none"); a filter other than none stays in the name (exact_match_strict-match[_stderr])."""
    metrics = {}
    for task, values in out["results"].items():
        row = {}
        for key, value in values.items():
            if "," not in key:  # alias, sample counts
                continue
            metric, filt = key.split(",", 1)
            name = metric.removesuffix("_stderr") + ("" if filt == "none" else f"_{filt}")
            name += "_stderr" if metric.endswith("_stderr") else ""
            row[name] = float(value) if isinstance(value, (int, float)) else None  # "N/A": no stderr
        metrics[task] = row
    return metrics


# -- task=lm_eval ---------------------------------------------------------------------------------------------
def main(cfg: DictConfig):
    with task_run(cfg, "lm_eval", print_summary=print_summary) as run:
        harness = require_harness()  # before any work
        tasks = task_names(cfg)
        c = cfg.lm_eval
        device = resolve_device(c.get("device") or cfg.train.get("device", "auto"))
        run.start_logger()
        from runner.lm_eval.model import VariantsLM

        tokenizer = harness_tokenizer(cfg)
        model, source = load_eval_model(cfg, device, tokenizer.vocab_size)
        record_model(run.results, model)
        dtype = autocast_dtype((cfg.get("train") or {}).get("dtype"), device, next(model.parameters()).dtype)
        lm = VariantsLM(model, tokenizer, batch_size=c.batch_size, max_length=c.get("max_length"),
                        max_gen_toks=c.max_gen_toks, dtype=dtype, seed=cfg.get("seed") or 0)
        run.results.update(weights=source, tokenizer=tokenizer.name)
        out = run_harness(lm, tasks, c)
        metrics = harness_metrics(out)
        run.results.update(metrics={"lm_eval": metrics}, lm_eval={
            "version": harness.__version__, "task_versions": out.get("versions"), "n_shot": out.get("n-shot"),
            "n_samples": out.get("n-samples"), "higher_is_better": out.get("higher_is_better"),
            "limit": c.get("limit"), "max_length": lm.max_length, "batch_size": lm.batch_size})
        if run.logger is not None:  # flat keys: W&B's tables and charts read one number per key
            run.logger.summary({f"lm_eval/{t}/{k}": v for t, row in metrics.items() for k, v in row.items()})
    return run.results.data


def print_summary(record: dict) -> None:
    lines = [f"lm_eval    {record.get('status')}  {record.get('weights') or ''}"]
    if record.get("error"):
        lines.append(f"error      {record['error']['type']}: {record['error']['message']}")
    versions = (record.get("lm_eval") or {}).get("task_versions") or {}
    for task, row in ((record.get("metrics") or {}).get("lm_eval") or {}).items():
        for name, value in row.items():
            if name.endswith("_stderr") or value is None:
                continue
            stderr = row.get(f"{name}_stderr")
            shown = f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
            lines.append(f"{task:<24} {name:<18} {shown:>10}" + (f" ± {stderr:.4f}" if stderr is not None else "")
                         + (f"   (v{versions[task]})" if task in versions else ""))
    lines.append(f"results    {record.get('output_dir', '')}/results.json")
    print("\n".join(lines))
