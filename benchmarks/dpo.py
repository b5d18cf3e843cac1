"""DPO pairs/s beside LLaMA-Factory's dpo: same YAML, same model, same pairs, one run.

    python -m benchmarks.dpo                 # zerotune rows on the SmolLM2 demo model
    python -m benchmarks.dpo --peers         # also LLaMA-Factory (make bench-peers installs it)
    python -m benchmarks.dpo --quick         # tiny random model, a handful of pairs

The pairs (written fresh by this script, seeded) have long-tailed prompts shared by both answers, the case where
padding and computing each prompt twice cost most: a prompt is an instruction plus a context passage whose length
is drawn from a log-normal, the answers are short. Every tool gets the same LLaMA-Factory YAML (stage dpo, LoRA on
all linear layers, pref_beta 0.1, sigmoid, the same cutoff, batch, learning rate and bf16 setting, one epoch);
zerotune's rows add one key each. pairs/s = pairs / the wall time of the whole command (loading, tokenizing, a
reference pass before training and saving included), so nothing a tool does is off the clock. Peak RSS is the
command's own maximum (throughput._run). "token slots" is what each layout computes: both sequences of every pair
padded to the batch's longest (LLaMA-Factory), both end to end (prefix sharing off), or each prompt once.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.throughput import PEERS_VENV, ROOT, _run, benchmark_model, run_filter, write_results

LF_ENV = {"HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "FORCE_TORCHRUN": "0", "WANDB_DISABLED": "true"}


@dataclass
class Row:
    name: str
    pairs_per_second: float
    wall_s: float
    peak_rss_gb: float
    token_slots: int | None
    first_loss: float | None
    note: str = ""


def write_pairs(folder: Path, pairs: int, seed: int = 0) -> Path:
    """A ranking dataset with long-tailed prompts (alpaca_en_demo's texts as material)."""
    rows = json.loads((ROOT / "examples/data/alpaca_en_demo.json").read_text())
    words = " ".join(r["instruction"] + " " + r["output"] for r in rows).split()
    rng = random.Random(seed)
    data = []
    for i in range(pairs):
        source = rows[rng.randrange(len(rows))]
        context_words = min(int(rng.lognormvariate(math.log(90), 0.9)), 700)
        start = rng.randrange(len(words) - context_words)
        answers = [r["output"].split() for r in rng.sample(rows, 2)]
        data.append({"instruction": source["instruction"],
                     "input": "Context: " + " ".join(words[start:start + context_words]),
                     "chosen": " ".join(answers[0][:rng.randint(20, 60)]),
                     "rejected": " ".join(answers[1][:rng.randint(20, 60)])})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pairs.json").write_text(json.dumps(data, indent=1))
    (folder / "dataset_info.json").write_text(json.dumps({"pairs": {
        "file_name": "pairs.json", "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}}}))
    return folder


def token_slots(model_dir: str, data_dir: Path, cutoff: int, batch: int) -> dict[str, int]:
    """Real tokens of the pairs, with each prompt once, and the slots of LLaMA-Factory's padded batches (in file
    order: its sampler shuffles, so this is an estimate of the same size)."""
    from transformers import AutoTokenizer

    from trainer.data.options import DataArguments
    from trainer.data.collators import Collator
    from trainer.data.packing import unpacked_dataset
    from trainer.data.processing import tokenized_dataset
    from trainer.data.templates import get_template

    tok = AutoTokenizer.from_pretrained(model_dir)
    args = DataArguments(dataset_dir=str(data_dir), cutoff_len=cutoff, tokenized_cache_dir=tempfile.mkdtemp())
    data, _ = tokenized_dataset(["pairs"], args, "pairwise", tok, get_template("chatml", tok), True)
    items = unpacked_dataset(data)
    pairs = [items[i] for i in range(len(items))]
    real = sum(len(p["input_ids"]) for p in pairs)
    shared = int(Collator(0, share_prefix=True)(pairs)["input_ids"].shape[1])
    padded = sum(2 * len(chunk) * max(n for p in chunk for n in p["lengths"])
                 for chunk in (pairs[k:k + batch] for k in range(0, len(pairs), batch)))
    return {"pairs": len(pairs), "real": real, "shared": shared, "padded": padded}


def common_yaml(model_dir: str, data_dir: Path, cutoff: int, batch: int, bf16: bool) -> dict:
    return {"model_name_or_path": model_dir, "stage": "dpo", "do_train": True, "finetuning_type": "lora",
            "lora_target": "all", "pref_beta": 0.1, "pref_loss": "sigmoid", "dataset": "pairs",
            "dataset_dir": str(data_dir), "template": "chatml", "cutoff_len": cutoff, "overwrite_cache": True,
            "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1, "learning_rate": 5e-6,
            "num_train_epochs": 1.0, "lr_scheduler_type": "cosine", "bf16": bf16, "logging_steps": 1,
            "save_strategy": "no", "report_to": "none", "overwrite_output_dir": True, "plot_loss": False}


ZEROTUNE_ROWS = {
    "zerotune dpo (defaults: prefix sharing, padding-free)": {},
    "zerotune dpo, prefix sharing off": {"pref_prefix_sharing": False},
    "zerotune dpo, packing": {"packing": True},
    "zerotune dpo, precomputed reference": {"precompute_ref_log_probs": True},
}


def _first_loss(out: Path) -> float | None:
    state = out / "trainer_state.json"
    if not state.is_file():
        return None
    losses = [e["loss"] for e in json.loads(state.read_text())["log_history"] if "loss" in e]
    return losses[0] if losses else None


def _write(cfg: dict, work: Path, name: str) -> tuple[Path, Path]:
    import yaml

    slug = "".join(c if c.isalnum() else "_" for c in name)
    out = work / slug
    cfg_file = work / f"{slug}.yaml"
    cfg_file.write_text(yaml.safe_dump({**cfg, "output_dir": str(out)}))
    return cfg_file, out


def table(rows: list[Row], baseline: str) -> str:
    base = next((r for r in rows if r.name == baseline), None)
    lines = ["| run | pairs/s | vs LLaMA-Factory | wall s | token slots | peak RSS GB | first loss |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r.pairs_per_second / base.pairs_per_second:.2f}x" if base else "-"
        slots = f"{r.token_slots:,}" if r.token_slots else "?"
        loss = f"{r.first_loss:.4f}" if r.first_loss is not None else "-"
        lines.append(f"| {r.name} | {r.pairs_per_second:.3f} | {ratio} | {r.wall_s:.1f} | {slots}{r.note} | "
                     f"{r.peak_rss_gb:.2f} | {loss} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny random model and 8 pairs")
    parser.add_argument("--peers", action="store_true", help="also LLaMA-Factory's dpo from .venv-peers")
    parser.add_argument("--pairs", type=int, default=None, help="pairs (default 64; quick 8)")
    parser.add_argument("--cutoff", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--only", default="", help="comma list of run names to keep (substring; =name exact)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from trainer.engine.hardware import cpu_supports_bf16

    work = Path(tempfile.mkdtemp(prefix="zerotune-dpo-bench-"))
    model_dir = benchmark_model(args.quick, work)
    pairs = args.pairs or (8 if args.quick else 64)
    data_dir = write_pairs(work / "data", pairs)
    bf16 = cpu_supports_bf16()
    slots = token_slots(model_dir, data_dir, args.cutoff, args.batch)
    print(f"benchmark set: {slots['pairs']} pairs, {slots['real']} real tokens ({slots['shared']} with each prompt "
          f"once; LLaMA-Factory's padded batches ~{slots['padded']} slots), cutoff {args.cutoff}, batch {args.batch}, "
          f"bf16 {bf16}", file=sys.stderr)
    base = common_yaml(model_dir, data_dir, args.cutoff, args.batch, bf16)
    wanted = run_filter(args.only)

    rows: list[Row] = []
    layout_slots = {"prefix sharing off": slots["real"], "packing": slots["shared"]}
    for name, extra in ZEROTUNE_ROWS.items():
        if not wanted(name):
            continue
        cfg_file, out = _write({**base, **extra}, work, name)
        code, wall, rss, log = _run([sys.executable, "-m", "trainer.cli", "train", str(cfg_file)], ROOT,
                                    {"ZEROTUNE_CACHE": str(work / "cache")})
        if code:
            raise RuntimeError(f"{name} failed:\n{log[-3000:]}")
        used = next((v for k, v in layout_slots.items() if k in name), slots["shared"])
        rows.append(Row(name, slots["pairs"] / wall, wall, rss, used, _first_loss(out)))
        print(f"  {name}: {slots['pairs'] / wall:.3f} pairs/s ({wall:.1f} s)", file=sys.stderr)
    if args.peers:
        if not (PEERS_VENV / "bin" / "llamafactory-cli").exists():
            print("peers are not installed: run `make bench-peers` first", file=sys.stderr)
            return 2
        name = "LLaMA-Factory dpo"
        cfg_file, out = _write({**base, "use_cpu": True}, work, name)
        code, wall, rss, log = _run([str(PEERS_VENV / "bin" / "llamafactory-cli"), "train", str(cfg_file)], ROOT,
                                    LF_ENV)
        if code:
            print(f"  {name} failed:\n{log[-3000:]}", file=sys.stderr)
        else:
            rows.append(Row(name, slots["pairs"] / wall, wall, rss, slots["padded"], _first_loss(out),
                            note=" (estimated)"))
            print(f"  {name}: {slots['pairs'] / wall:.3f} pairs/s ({wall:.1f} s)", file=sys.stderr)

    write_results(args.out, "dpo", table(rows, "LLaMA-Factory dpo"),
                  {"model": model_dir, "token_slots": slots, "settings": base}, rows)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
