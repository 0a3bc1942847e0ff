"""What users watch: a console line per step (loss, LR, tokens/s, ETA), TensorBoard, optional
Weights & Biases, and a loss-curve PNG at the end. Only rank 0 writes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vlm_bridge.convert.hf_io import write_text_atomic
from vlm_bridge.train.config import TrainConfig, to_dict


class RunLogger:
    def __init__(self, cfg: TrainConfig, is_main: bool, start_step: int = 0) -> None:
        self.cfg, self.is_main = cfg, is_main
        self.out = Path(cfg.output_dir)
        self.start, self.start_step = time.time(), start_step
        self.tokens = 0
        self.validation: list[tuple[int, float]] = []  # (step, validation loss) for the plot
        self.tb = self.wandb = None
        self.started = False

    def _start(self) -> None:
        """The run folder's config and loggers, once there is something to log: a run that fails
        before that leaves an existing folder (one being resumed) as it was."""
        if self.started:
            return
        self.started = True
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / "config.json", json.dumps(to_dict(cfg), indent=2, default=str))
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                print("note: wandb=true but wandb is not installed; skipping W&B logging")
            else:
                self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.name, config=to_dict(cfg))

    def log(self, step: int, stats: dict, seconds: float) -> None:
        if not self.is_main:
            return
        self._start()
        self.tokens += stats["tokens"]
        done = step - self.start_step
        elapsed = time.time() - self.start
        eta = elapsed / max(done, 1) * (self.cfg.steps - step)
        tps = stats["tokens"] / max(seconds, 1e-9)
        skipped = "" if stats.get("update_ok", True) else (
            f"  update skipped: fp16 gradients overflowed, loss scale now {stats['loss_scale']:g}")
        if step % self.cfg.log_every == 0 or step == self.cfg.steps or skipped:
            print(f"step {step:>5}/{self.cfg.steps}  loss {stats['loss']:.4f}  lr {stats['lr']:.2e}  "
                  f"grad {stats['grad_norm']:.2f}  {tps:,.0f} tok/s  eta {eta:,.0f}s{skipped}", flush=True)
        scalars = {"loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                   "tokens_per_s": tps}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def log_eval(self, step: int, report: dict) -> None:
        """Validation: a console line, ``val/*`` scalars (loss, perplexity, answer metrics)."""
        if not self.is_main:
            return
        self._start()
        scalars = {k: report[k] for k in ("loss", "perplexity") if k in report}
        scalars.update(report.get("metrics", {}))
        shown = "  ".join(f"{k} {v:.4f}" if k in ("loss", "perplexity") else f"{k} {100 * v:.1f}%"
                          for k, v in scalars.items())
        print(f"eval {step:>5}/{self.cfg.steps}  {shown}  ({report['samples']} samples)", flush=True)
        if "loss" in report:
            self.validation.append((step, report["loss"]))
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(f"val/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"val/{k}": v for k, v in scalars.items()}, step=step)

    def close(self, losses: list[float]) -> None:
        if not self.is_main:
            return
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if losses:
            self.out.mkdir(parents=True, exist_ok=True)
            write_loss_plot(losses, self.out / "loss.png", self.cfg.name, self.validation)


def write_loss_plot(losses: list[float], path: Path, title: str,
                    validation: list[tuple[int, float]] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, lw=1.5, label="train")
    if validation:
        steps, values = zip(*validation)
        ax.plot(steps, values, "o-", lw=1.5, label="validation")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
