"""`python run.py task=coordcheck`: the coordinate check of µP (Yang et al. 2022, Tensor Programs V, section 6):
train the composed model a few steps at several widths and watch each layer's activation size.

    python run.py task=coordcheck model.parametrization=mup coordcheck.widths=[64,128,256]
    python run.py task=coordcheck model.parametrization=sp            # the same under SP: the curves grow

Every width trains from the same seed on the same batches with the configured optimizer (train/optimizer) at a
constant train.lr (no schedule: the check is about the first updates). Each step's forward records the RMS of
the embedding output, every block's output and the logits, before that step's update. Under µP the curves lie
on top of each other across widths; under SP the logits (and with Adam the blocks) grow with width.
results.json gets `coord_check` (the RMS per width, layer and step, and `growth`: the logits' RMS at the last
step, largest width over smallest), and coordcheck.png draws it.
"""
import logging

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

from runner.build import build_model, check_model_config, resolve_device
from runner.compute import IGNORE, to_device
from runner.optim import build_optimizer
from runner.task import config_checks, task_run

log = logging.getLogger(__name__)


def check_coordcheck_config(cfg: DictConfig) -> None:
    c = cfg.coordcheck
    widths = list(c.widths)
    if len(widths) < 2 or any(not isinstance(w, int) or w < 1 for w in widths) or widths != sorted(set(widths)):
        raise ValueError(f"coordcheck.widths={widths} must be two or more increasing positive integers")
    if c.steps < 1:
        raise ValueError(f"coordcheck.steps={c.steps} must be >= 1")
    for width in widths:  # every width must build (heads dividing it, ...)
        try:
            check_model_config(model_config_at(cfg, width, widths[0]))
        except (ValueError, TypeError) as err:
            raise type(err)(f"coordcheck.widths={widths}: at d_model={width}, {err}") from None


def model_config_at(cfg: DictConfig, width: int, smallest: int) -> DictConfig:
    """The composed model at d_model=width; µP's base_width, when unset, is the smallest width."""
    model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    with open_dict(model_cfg):
        model_cfg.d_model = width
        if model_cfg.get("base_width") is None:
            model_cfg.base_width = smallest
    return model_cfg


def main(cfg: DictConfig):
    with task_run(cfg, "coordcheck", print_summary=print_summary) as run:
        with config_checks():
            check_coordcheck_config(cfg)
            from runner.data import check_data_config
            check_data_config(cfg.data)
        run.start_logger()
        from runner.data import BatchLoader, build_data
        data = build_data(cfg)
        if cfg.model.get("vocab_size") is None:
            with open_dict(cfg):
                cfg.model.vocab_size = data.tokenizer.vocab_size
        device = resolve_device(cfg.train.device)
        widths = list(cfg.coordcheck.widths)
        rms = {}
        for width in widths:
            loader = BatchLoader(data.train, cfg.coordcheck.batch_size, seed=cfg.train.seed)
            rms[str(width)] = train_and_record(cfg, model_config_at(cfg, width, widths[0]), loader, device)
            log.info(f"width {width}: logits RMS by step {[round(v, 3) for v in rms[str(width)]['logits']]}")
        check = {"widths": widths, "steps": cfg.coordcheck.steps, "parametrization": cfg.model.get("parametrization"),
                 "optimizer": cfg.train.optimizer.get("_target_"), "lr": cfg.train.lr, "rms": rms,
                 "growth": rms[str(widths[-1])]["logits"][-1] / rms[str(widths[0])]["logits"][-1]}
        run.results.update(coord_check=check)
        check["png"] = str(plot_coord_check(check, run.results.path.parent / "coordcheck.png"))
        run.results.update(coord_check=check)
    return run.results.data


def train_and_record(cfg: DictConfig, model_cfg: DictConfig, loader, device) -> dict[str, list[float]]:
    """coordcheck.steps optimizer steps at a constant lr; per layer, the activation RMS of each step's forward."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(model_cfg, device).train()
    optimizer = build_optimizer(cfg.train, model, device)
    rms: dict[str, list[float]] = {}

    def record(name):
        return lambda module, args, out: rms.setdefault(name, []).append(_rms(out))

    hooks = [model.embed.register_forward_hook(record("embedding"))]
    hooks += [block.register_forward_hook(record(f"block {i}")) for i, block in enumerate(model.blocks)]
    for _ in range(cfg.coordcheck.steps):
        batch = to_device(next(loader), device)
        logits = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                       document_ids=batch.get("document_ids"))  # the logits themselves, not a chunked loss
        rms.setdefault("logits", []).append(_rms(logits))
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for hook in hooks:
        hook.remove()
    return rms


def _rms(x: torch.Tensor) -> float:
    x = x[0] if isinstance(x, tuple) else x
    return x.detach().float().pow(2).mean().sqrt().item()


def plot_coord_check(check: dict, path):
    """One panel per layer: activation RMS against width, one line per step (the mup package's layout)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from runner.report.png import STYLE

    widths = check["widths"]
    layers = list(check["rms"][str(widths[0])])
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(layers), figsize=(2.4 * len(layers), 2.8), sharey=False, squeeze=False)
        for ax, layer in zip(axes[0], layers):
            for step in range(check["steps"]):
                color = plt.cm.viridis(step / max(1, check["steps"] - 1))
                ax.plot(widths, [check["rms"][str(w)][layer][step] for w in widths], marker="o", markersize=3,
                        linewidth=1.2, color=color, label=f"step {step + 1}")
            ax.set(title=layer, xscale="log", yscale="log", xlabel="width (d_model)")
            ax.minorticks_off()
            ax.set_xticks(widths, [str(w) for w in widths])
        axes[0][0].set_ylabel("activation RMS")
        axes[0][-1].legend(loc="best")
        fig.suptitle(f"coordinate check: {check['parametrization']}, {str(check['optimizer']).rsplit('.', 1)[-1]}, "
                     f"lr {check['lr']:g}; logits growth x{check['growth']:.2f}")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
    return path


def print_summary(record: dict):
    check = record.get("coord_check")
    if record.get("error"):
        print(f"\nstatus {record.get('status')}: {record['error']['type']}: {record['error']['message']}")
    if not check:
        return
    print(f"\ncoordinate check ({check['parametrization']}): logits RMS at the last step, largest width over "
          f"smallest: x{check['growth']:.2f}")
    for width, layers in check["rms"].items():
        print(f"  width {width:>5}: " + ", ".join(f"{name} {values[-1]:.3g}" for name, values in layers.items()))
    print(f"results {record.get('output_dir', '')}/results.json, {check.get('png')}")
