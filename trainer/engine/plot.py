"""plot_loss: training_loss.png (and training_eval_loss.png, or the stage's other figures: ppo's training_reward.png)
from trainer_state.json's log history."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled to zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def plot_loss(output_dir: str, keys: tuple[str, ...] = ("loss", "eval_loss")) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    written = []
    for key in keys:
        points = [(e["step"], e[key]) for e in state.get("log_history", []) if key in e]
        if not points:
            logger.info("No %s in the log history; not plotting it.", key)
            continue
        steps, values = zip(*points)
        fig = plt.figure(figsize=(7, 4))
        plt.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
        if len(values) > 2:
            plt.plot(steps, _smooth(list(values)), color="#1f77b4", label="smoothed")
        plt.title(f"{key} of {output_dir}")
        plt.xlabel("step")
        plt.ylabel(key)
        plt.legend()
        path = Path(output_dir) / ("training_loss.png" if key == "loss" else f"training_{key}.png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
        logger.info("Plot of %s written to %s.", key, path)
    return written
