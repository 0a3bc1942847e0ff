"""Validation during fine-tuning: ``data.validation`` evaluated every ``eval.every`` steps (and after
the last one) with the same code as ``vlm-bridge evaluate``: the training loss on held-out samples,
its perplexity and, with ``eval.generate``, generated answers scored by ``eval.metrics``."""

from __future__ import annotations

from vlm_bridge.inference.evaluate import EvalOptions, evaluate_model
from vlm_bridge.train.config import TrainConfig


class Validator:
    def __init__(self, cfg: TrainConfig, built) -> None:
        from vlm_bridge.data.sources import load_source
        from vlm_bridge.loading import load_processor

        settings = cfg.eval  # its values, the metrics included, are checked by check_config
        metrics = tuple(settings.metrics or ("exact_match",))
        self.every, self.steps = settings.every, cfg.steps
        self.samples = list(load_source(cfg.data.validation))
        if not self.samples:
            raise ValueError(f"data.validation {cfg.data.validation!r} holds no samples")
        self.processor = load_processor(built.hf_side_dir)
        self.options = EvalOptions(
            generate=settings.generate, metrics=metrics,
            max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
            micro_batch_size=cfg.micro_batch_size, seq_len=cfg.data.seq_len, max_samples=settings.max_samples,
            metric_option="eval.metrics",
        )

    def due(self, step: int) -> bool:
        return step == self.steps or (self.every > 0 and step % self.every == 0)

    def run(self, run) -> dict:
        """Run on every rank: the evaluation report of the model as it is now."""
        return evaluate_model(run.built, run.model, self.processor, self.samples, self.options)
