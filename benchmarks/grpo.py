"""GRPO beside TRL's GRPOTrainer: same model, prompts, reward function and step count, one run.

    python -m benchmarks.grpo                # zerotune rows on the SmolLM2 demo model
    python -m benchmarks.grpo --peers        # also TRL's GRPOTrainer (make bench-trl installs it in .venv-trl)
    python -m benchmarks.grpo --steps 2      # a small scale

Every run: SmolLM2-135M-Instruct, the addition prompts of examples/grpo_lora.yaml in file order, the reward
examples/grpo_rewards.py:exact_sum, num_generations 8, max_completion_length 64, LoRA r16 (alpha 32) on all linear
layers, beta 0.04, 16 completions a step (2 prompts x 8), temperature 1 and no top-k / top-p, the same number of
optimizer steps; each tool's defaults otherwise (loss_type dapo in both). Precision: bf16 where the CPU has it natively
(TRL's GRPOConfig default, and the throughput benchmark's rule; zerotune `bf16: true`), fp32 elsewhere or with
--fp32: both tools always in the same one. zerotune's rows turn its two
shortcuts off one at a time: grpo_prefix_sharing (each prompt computed once a group in the update forwards) and
grpo_shared_prefill (each prompt prefilled once in generation). Wall time is the whole command (loading, the
reference and generation included); peak RSS is the command's own maximum (throughput._run). step-0 loss and reward
are the first logged step's: sampled, so they agree between tools only within sampling noise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from benchmarks.throughput import ROOT, _run, benchmark_model, cpu_precision_line, run_filter, write_results

TRL_VENV = ROOT / ".venv-trl"
ZEROTUNE_ROWS = {
    "zerotune": {},
    "zerotune, shared prefill off": {"grpo_shared_prefill": False},
    "zerotune, shared prefill and prompt forward off": {"grpo_shared_prefill": False, "grpo_prefix_sharing": False},
}


@dataclass
class Row:
    name: str
    wall_s: float
    peak_rss_gb: float
    first_loss: float | None
    first_reward: float | None
    last_reward: float | None


def common_yaml(model_dir: str, steps: int, lr: float, bf16: bool) -> dict:
    return {"model_name_or_path": model_dir, "stage": "grpo", "do_train": True, "finetuning_type": "lora",
            "lora_target": "all", "lora_rank": 16, "lora_alpha": 32,
            "reward_funcs": str(ROOT / "examples/grpo_rewards.py") + ":exact_sum",
            "num_generations": 8, "max_completion_length": 64, "beta": 0.04, "loss_type": "dapo",
            "dataset": "arithmetic_demo", "dataset_dir": str(ROOT / "examples/data"), "template": "chatml",
            "cutoff_len": 128, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 1,
            "learning_rate": lr, "max_steps": steps, "logging_steps": 1, "save_steps": 100000, "bf16": bf16,
            "temperature": 1.0, "overwrite_output_dir": True, "report_to": "none"}


def _firsts(history: list[dict]) -> tuple:
    logged = [e for e in history if "reward" in e]
    if not logged:
        return None, None, None
    return logged[0].get("loss"), logged[0]["reward"], logged[-1]["reward"]


def table(rows: list[Row], baseline: str) -> str:
    base = next((r for r in rows if r.name == baseline), None)
    lines = ["| run | wall s | vs TRL | peak RSS GB | step-0 loss | step-0 reward | last reward |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{base.wall_s / r.wall_s:.2f}x" if base else "-"
        num = (lambda v: f"{v:.4f}" if v is not None else "-")
        lines.append(f"| {r.name} | {r.wall_s:.1f} | {ratio} | {r.peak_rss_gb:.2f} | {num(r.first_loss)} | "
                     f"{num(r.first_reward)} | {num(r.last_reward)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", action="store_true", help="also TRL's GRPOTrainer from .venv-trl")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of every run")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--fp32", action="store_true", help="fp32 in both tools even where the CPU has native bf16")
    parser.add_argument("--only", default="", help="comma list of run names to keep (substring; =name exact)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="zerotune-grpo-bench-"))
    model_dir = benchmark_model(False, work)
    from trainer.engine.hardware import cpu_supports_bf16

    bf16 = cpu_supports_bf16() and not args.fp32
    base = common_yaml(model_dir, args.steps, args.lr, bf16)
    wanted = run_filter(args.only)
    rows: list[Row] = []
    for name, extra in ZEROTUNE_ROWS.items():
        if not wanted(name):
            continue
        out = work / name.replace(" ", "_").replace(",", "")
        cfg_file = work / f"{out.name}.yaml"
        cfg_file.write_text(yaml.safe_dump({**base, **extra, "output_dir": str(out)}))
        code, wall, rss, log = _run([sys.executable, "-m", "trainer.cli", "train", str(cfg_file)], ROOT,
                                    {"ZEROTUNE_CACHE": str(work / "cache")})
        if code:
            raise RuntimeError(f"{name} failed:\n{log[-3000:]}")
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        rows.append(Row(name, wall, rss, *_firsts(history)))
        print(f"  {name}: {wall:.1f} s, peak RSS {rss:.2f} GB", file=sys.stderr)
    if args.peers:
        if not (TRL_VENV / "bin" / "trl").exists():
            print("TRL is not installed: run `make bench-trl` first", file=sys.stderr)
            return 2
        name, out = "TRL GRPOTrainer", work / "trl"
        cmd = [str(TRL_VENV / "bin" / "python"), str(ROOT / "benchmarks/trl_grpo.py"), "--model", model_dir,
               "--out", str(out), "--prompts", "400", "--batch", "16", "--generations", "8", "--completion", "64",
               "--steps", str(args.steps), "--beta", "0.04", "--lr", str(args.lr)] + (["--bf16"] if bf16 else [])
        code, wall, rss, log = _run(cmd, ROOT, {"HF_HUB_OFFLINE": "1", "WANDB_DISABLED": "true"})
        if code:
            print(f"  {name} failed:\n{log[-3000:]}", file=sys.stderr)
        else:
            rows.append(Row(name, wall, rss, *_firsts(json.loads((out / "log_history.json").read_text()))))
            print(f"  {name}: {wall:.1f} s, peak RSS {rss:.2f} GB", file=sys.stderr)

    md = cpu_precision_line(bf16) + "\n\n" + table(rows, "TRL GRPOTrainer")
    write_results(args.out, "grpo" if bf16 else "grpo-fp32", md, {"model": model_dir, "settings": base}, rows)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
