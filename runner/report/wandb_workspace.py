"""`python run.py task=compare compare.wandb=true`: a W&B workspace for one sweep (wandb-workspaces).

The runs already carry what the panels need (runner/tracking.py): the sweep as their group, the variant
choices as config fields (`variant.<family>`), curves as `train/loss`, `val/loss`, `val/ppl` against
`step`, and summaries `val_ppl`, `train_tokens_per_s`, `bench/peak_memory_bytes`,
`bench/kv_cache_bytes_per_token`. The workspace filters to the sweep's group and groups runs by the
families that name its variants (as the local report's labels do), so the seeds of one variant are drawn
as one line with a min-max band.
"""
import os

from omegaconf import DictConfig

from runner.report.format import FINISHED
from runner.tracking import FAMILIES

CURVES = (("validation loss", "val/loss"), ("training loss", "train/loss"), ("validation perplexity", "val/ppl"))
MEMORY = (("peak memory (bytes)", "bench/peak_memory_bytes"),
          ("KV-cache bytes per token", "bench/kv_cache_bytes_per_token"))


class MissingAPIKey(RuntimeError):
    pass


def api_key() -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    import wandb
    try:
        return wandb.Api().api_key  # reads ~/.netrc and W&B settings; raises without a key
    except Exception:
        return None


def require_api_key() -> None:
    if not api_key():
        raise MissingAPIKey("compare.wandb=true builds a workspace in your W&B account, and no W&B API key "
                            "is configured: run `wandb login` or set WANDB_API_KEY. The local report "
                            "(report.html, report.md) needs no account: drop compare.wandb=true.")


def pick_group(runs: list[dict], group: str | None) -> str:
    """The requested sweep group, else the group of the most recently started sweep among the runs."""
    groups = {r["group"] for r in runs if r["group"]}
    if group:
        if group not in groups:
            print(f"compare.group={group!r} matches none of the local runs' groups {sorted(groups)}; "
                  f"using it anyway (the runs may live only on W&B)")
        return group
    if not groups:
        raise ValueError("compare.wandb=true needs a sweep: none of the gathered runs belongs to a W&B group. "
                         "Run a sweep (`python run.py -m ...`) or name one with compare.group=...")
    latest = max((r for r in runs if r["group"]), key=lambda r: r["started_at"] or "")
    return latest["group"]


def build_workspace(runs: list[dict], entity: str, project: str, group: str, name: str | None = None):
    """The workspace object (not yet saved): loss curves by variant, perplexity vs tokens/s, memory,
    and one bar chart of mean perplexity per varying family."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    in_group = [r for r in runs if r["group"] == group] or runs
    varying = [f for f in FAMILIES if len({r["variant"].get(f) for r in in_group}) > 1]
    label_fields = [f for f in in_group[0]["label_fields"] if f in varying] if in_group else []
    effect_families = [f for f in varying
                       if len({r["variant"].get(f) for r in in_group if r["status"] == FINISHED}) > 1]
    summary = wr.SummaryMetric
    sections = [
        ws.Section(name="Loss curves by variant", is_open=True, panels=[
            wr.LinePlot(title=title, x="step", y=[key], groupby_aggfunc="mean", groupby_rangefunc="minmax",
                        smoothing_type="none")
            for title, key in CURVES]),
        ws.Section(name="Perplexity vs training tokens/s", is_open=True, panels=[
            wr.ScatterPlot(title="validation perplexity vs training tokens/s (lower right is better)",
                           x=summary("train_tokens_per_s"), y=summary("val_ppl")),
            wr.ParallelCoordinatesPlot(title="choices → perplexity, throughput", columns=[
                *(wr.ParallelCoordinatesPlotColumn(metric=wr.Config(f"variant.{f}")) for f in varying),
                wr.ParallelCoordinatesPlotColumn(metric=summary("val_ppl")),
                wr.ParallelCoordinatesPlotColumn(metric=summary("train_tokens_per_s"))]),
            wr.RunComparer(diff_only="split")]),
        ws.Section(name="Memory", is_open=True, panels=[
            wr.BarPlot(title=title, metrics=[summary(key)], groupby_aggfunc="mean") for title, key in MEMORY]),
        ws.Section(name="Effect of each choice", is_open=True, panels=[
            wr.BarPlot(title=f"validation perplexity by {f}", metrics=[summary("val_ppl")],
                       groupby=wr.Config(f"variant.{f}"), groupby_aggfunc="mean", groupby_rangefunc="stderr")
            for f in effect_families]),
    ]
    if any(r.get("ladder") and len(r["ladder"]) > 1 for r in in_group):  # train.cooldowns: loss vs compute
        sections.append(ws.Section(name="Loss vs compute (cooldowns)", is_open=True, panels=[
            wr.LinePlot(title="cooldown validation loss vs training FLOPs", x="cooldown/flops", y=["cooldown/val_loss"],
                        log_x=True, log_y=True, groupby_aggfunc="mean", groupby_rangefunc="minmax")]))
    return ws.Workspace(
        entity=entity, project=project, name=name or f"compare {group}", sections=sections,
        settings=ws.WorkspaceSettings(x_axis="step"),
        runset_settings=ws.RunsetSettings(filters=[ws.Metric("Group") == group],
                                          groupby=[ws.Config(f"variant.{f}") for f in label_fields]))


def publish(runs: list[dict], cfg: DictConfig) -> str:
    """Build the sweep's workspace and save it to W&B; returns its URL."""
    require_api_key()
    lc, c = cfg.logger, cfg.compare
    group = pick_group(runs, c.get("group"))
    entity = lc.get("entity")
    if not entity:
        import wandb
        entity = wandb.Api().default_entity
    workspace = build_workspace(runs, entity, lc.project, group, c.get("workspace_name"))
    workspace.save()
    return workspace.url
