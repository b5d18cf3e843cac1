"""Data at scale: tokenizing, packing and planning a large SFT set, in time and peak memory (not a timed test).

    python -m benchmarks.data_scale                      # 300,000 generated alpaca rows, a 1M-example plan
    python -m benchmarks.data_scale --rows 3000 --plan 20000 --tokenizer tiny     # a smoke run

Each measurement runs in a fresh process, so its peak RSS is its own: (1) tokenize the rows (the cache builder,
all cores) and pack them best-fit into rows of cutoff_len; (2) plan 1M example lengths and hold the plan as
zerotune's data loader does. The rows are generated here (short alpaca rows: a 4-25 word instruction, an optional
input, a 5-120 word answer), so the run needs no download. The tokenizer is the demo model's (SmolLM2, `make
demo-model`), or the tiny test tokenizer.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is was for on that with as by at from his an were are which this be or has had one "
         "data model train write explain list describe summary answer question number water city river science "
         "history music code function value system energy health market language people world time").split()


def generate_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"instruction": words(4, 25).capitalize() + "?",
                                "input": words(3, 30) if rng.random() < 0.4 else "", "output": words(5, 120) + "."}))
            f.write("\n")


def _tokenizer(kind: str, work: Path):
    from transformers import AutoTokenizer

    if kind == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import build_tokenizer

        return build_tokenizer(work / "tok")
    from trainer.demo import prepare

    return AutoTokenizer.from_pretrained(prepare(ROOT / "models" / "smollm2-135m-instruct"))


def _peak_gb(who) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20  # KiB on Linux


def child_tokenize(args) -> dict:
    from trainer.data.options import DataArguments
    from trainer.data.packing import pack_dataset
    from trainer.data.processing import tokenized_dataset
    from trainer.data.templates import get_template

    work = Path(args.work)
    tok = _tokenizer(args.tokenizer, work)
    data_args = DataArguments(dataset_dir=str(work), cutoff_len=args.cutoff, tokenized_cache_dir=str(work / "cache"))
    start = time.perf_counter()
    data, report = tokenized_dataset(["rows"], data_args, "supervised", tok, get_template("chatml", tok), True)
    tokenized_s = time.perf_counter() - start
    packed, efficiency = pack_dataset(data, args.cutoff)
    total_s = time.perf_counter() - start
    return {"rows": report.read, "examples": report.examples, "tokens": report.tokens, "tokenize_s": round(tokenized_s, 1),
            "tokenize_pack_plan_s": round(total_s, 1), "packed_rows": len(packed),
            "packing_efficiency": round(efficiency, 4), "peak_rss_gb_main": round(_peak_gb(resource.RUSAGE_SELF), 3),
            "peak_rss_gb_largest_worker": round(_peak_gb(resource.RUSAGE_CHILDREN), 3)}


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child_plan(args) -> dict:
    import numpy as np

    from trainer.data.packing import best_fit_bins

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.0, 0.8, args.plan).astype(np.int64), 8, args.cutoff).tolist()
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    bins = best_fit_bins(lengths, args.cutoff)
    # What the data loader keeps: the plan as two integer arrays (packing.Items).
    members = np.fromiter((i for b in bins for i in b), dtype=np.int64)
    offsets = np.cumsum([0] + [len(b) for b in bins], dtype=np.int64)
    seconds = time.perf_counter() - start
    growth = (_status_kb("VmHWM") - before) / 2**20
    del bins
    valid = bool(np.array_equal(np.sort(members), np.arange(len(lengths))))
    sizes = np.add.reduceat(np.asarray(lengths)[members], offsets[:-1]) if len(offsets) > 1 else np.array([0])
    valid = valid and int(sizes.max()) <= args.cutoff
    return {"plan_examples": len(lengths), "plan_rows": len(offsets) - 1, "plan_s": round(seconds, 1),
            "plan_rss_growth_gb": round(growth, 3), "plan_valid": valid}


def _run_child(what: str, args, work: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.data_scale", "--child", what, "--work", str(work), "--rows",
           str(args.rows), "--plan", str(args.plan), "--cutoff", str(args.cutoff), "--tokenizer", args.tokenizer]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--plan", type=int, default=1_000_000, help="example lengths to plan")
    parser.add_argument("--cutoff", type=int, default=1024)
    parser.add_argument("--tokenizer", choices=("demo", "tiny"), default="demo")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--child", choices=("tokenize", "plan"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.path.insert(0, str(ROOT))
        result = child_tokenize(args) if args.child == "tokenize" else child_plan(args)
        print(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory(prefix="zerotune-data-scale-") as tmp:
        work = Path(tmp)
        generate_rows(work / "rows.jsonl", args.rows)
        (work / "dataset_info.json").write_text(json.dumps({"rows": {"file_name": "rows.jsonl"}}))
        result = {"cutoff_len": args.cutoff, "tokenizer": args.tokenizer, "cores": __import__("os").cpu_count(),
                  **_run_child("tokenize", args, work), **_run_child("plan", args, work)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_scale.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
