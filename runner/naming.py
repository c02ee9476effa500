"""Run and sweep directory names from the task and the overridden choices (conf/config.yaml's hydra.run.dir,
hydra.sweep.dir and hydra.sweep.subdir), e.g. outputs/sweeps/<date>/<time>_attention/3_attention=mqa,seed=1.

Hydra's own ${hydra.job.override_dirname} keeps each key as typed: `model/attention=mqa` would nest a folder.
This resolver takes the same overrides and exclude_keys (hydra.job.config.override_dirname), shortens each key
to its last part (`attention=mqa`, `seed=1`; the full key where two would read alike), puts config-group
choices first and cuts a long list on an item boundary. Imported by run.py, so no torch here.
"""
import os
import re
import shlex
import sys

from omegaconf import OmegaConf

MAX_LENGTH = 100  # characters of overrides in a folder name; the rest is counted, not spelled
_UNSAFE = re.compile(r"[/\\\s'\"*?:<>|]+")  # path separators, spaces, quotes and shell/Windows specials


NOT_IN_NAMES = ("prompt",)  # free text: it says nothing a folder name should (results.json keeps it)


def override_items(overrides, exclude_keys=()) -> list[tuple[str, str, bool]]:
    """(key, value, is_group_choice) per override, excluded keys (and `+`/`~` prefixes) dropped."""
    items = []
    for line in overrides:
        key, _, value = str(line).partition("=")
        key = key.lstrip("+~")
        if key in exclude_keys or key.startswith("hydra.") or key.split(".")[-1] in NOT_IN_NAMES:
            continue
        items.append((key, value, "/" in key or "." not in key))
    return items


def name_value(value: str) -> str:
    """A value as a folder name spells it: the user's spelling of booleans (an experiment file's `false` arrives
    as Python's `False`), a path by its last part, a list without brackets (`[1,8]` -> `1_8`)."""
    if value in ("True", "False"):
        return value.lower()
    parts = [p.strip().strip("'\"") for p in value.strip("[]").split(",")] if value.startswith("[") else [value]
    parts = [p.rstrip("/").rsplit("/", 1)[-1] if "/" in p else p for p in parts]
    return "_".join(parts)


def job_dirname(overrides, exclude_keys=(), max_length: int = MAX_LENGTH) -> str:
    """`attention=mqa,seed=1` for overrides `model/attention=mqa train.seed=1`; "" for none."""
    items = override_items(overrides, exclude_keys)
    short = [re.split(r"[./]", key)[-1] for key, _, _ in items]
    names = [s if short.count(s) == 1 else key.replace("/", ".") for s, (key, _, _) in zip(short, items)]
    parts = sorted((not group, f"{name}={_UNSAFE.sub('_', name_value(value))}")
                   for name, (_, value, group) in zip(names, items))
    out, kept = "", 0
    for _, part in parts:
        if out and len(out) + 1 + len(part) > max_length:
            break
        out, kept = f"{out},{part}" if out else part, kept + 1
    return out + (f",+{len(parts) - kept}" if kept < len(parts) else "")


def _suffix(overrides, exclude_keys) -> str:
    """`_<job_dirname>`, or "" when nothing was overridden: folder names read `<time>_<task>_<choices>`."""
    name = job_dirname(OmegaConf.to_container(overrides) if OmegaConf.is_config(overrides) else overrides,
                       OmegaConf.to_container(exclude_keys) if OmegaConf.is_config(exclude_keys) else exclude_keys)
    return f"_{name}" if name else ""


def register() -> None:
    """${variants.dirname:<overrides>,<exclude_keys>} for conf/config.yaml (idempotent)."""
    if not OmegaConf.has_resolver("variants.dirname"):
        OmegaConf.register_new_resolver("variants.dirname", _suffix)


HYDRA_SPECIAL = set("=,+ []{}()'\"\\:$~*")


def override(key: str, value) -> str:
    """`key=value` as one shell word that Hydra's override grammar reads back, quoted no more than needed: a
    folder named after its overrides holds '=' and ',' (e.g. ..._attention=mqa,seed=1), which Hydra needs in
    single quotes, and the shell then gets the word in double quotes ("hydra.run.dir='...'")."""
    text = str(value)
    if any(c in HYDRA_SPECIAL for c in text):
        text = "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return quote_override(f"{key}={text}")


def quote_override(text: str) -> str:
    """An override as the user typed it (`model=mqa_rope`, `prompt='def f(x):'`), as one shell word, quoted
    no more than needed: bare when safe, else in double quotes when nothing inside expands, else shlex's."""
    if shlex.quote(text) == text:
        return text
    return f'"{text}"' if not any(c in text for c in '"$`\\!') else shlex.quote(text)


def run_py() -> str:
    """run.py as this process was started (`python ~/llm-variants/run.py` from another folder), for the
    commands it prints; `run.py` when started otherwise (tests, submitit)."""
    script = sys.argv[0] if sys.argv else ""
    return shlex.quote(script) if os.path.basename(script) == "run.py" else "run.py"


register()  # on import: a submitit job imports this module when it unpickles run.py's main()

