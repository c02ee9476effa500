"""A misspelled config choice (`model=gqa_rpoe`, `model/attention=gqq`) caught before Hydra composes: one line
with the closest names, and only what can be chosen (Hydra's own message lists every file of the group,
`base` included, and suggests nothing). Light: no torch, read from conf/ as run.py starts.
"""
import difflib
import re
from pathlib import Path

NOT_CHOICES = {"model": {"base"}}  # files that other choices build on, not choices themselves
SWEEP_SYNTAX = re.compile(r"[()${}*\[\]]")  # choice(...), range(...), glob(...), interpolations: Hydra's business


def group_options(conf: Path, group: str) -> list[str]:
    folder = conf / group
    return sorted(p.stem for p in folder.glob("*.yaml") if p.stem not in NOT_CHOICES.get(group, ()))


def unknown_choice(argv: list[str], conf: Path) -> str | None:
    """The message for the first `group=name` override whose group is a folder of conf/ without `name`
    (each name of a sweep's comma list is checked), else None."""
    for arg in argv:
        key, eq, value = arg.lstrip("+~").partition("=")
        if not eq or arg.startswith("hydra") or "." in key or not (conf / key).is_dir() or SWEEP_SYNTAX.search(value):
            continue
        options = group_options(conf, key)
        for name in filter(None, value.split(",")):
            if name != "null" and name not in options:
                close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
                hint = f"did you mean {' or '.join(f'{key}={c}' for c in close)}? " if close else ""
                return f"config error: {key}={name} is not one of conf/{key}/: {hint}choose from {', '.join(options)}"
    return None
