"""The benchmark runs end to end in its quick mode (no timing assertions: numbers are for benchmarks/RESULTS.md)."""

import json

from benchmarks.throughput import estimated_padding, main


def test_quick_benchmark_writes_table_json_and_chart(tmp_path):
    assert main(["--quick", "--only", "lora packed,lora padd", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "throughput.json").read_text())
    names = [r["name"] for r in data["results"]]
    assert names == ["zerotune lora packed", "zerotune lora packed, whole batch a pass",
                     "zerotune lora packed, checkpointing on", "zerotune lora padding-free",
                     "zerotune lora padding-free, whole batch a pass", "zerotune lora padded",
                     "zerotune lora packed, full logits"]
    assert all(r["tokens_per_second"] > 0 and r["peak_rss_gb"] > 0 for r in data["results"])
    by_name = {r["name"]: r for r in data["results"]}
    assert by_name["zerotune lora padded"]["padding_fraction"] > 0.1  # the peers' layout pays for padding
    for name in ("zerotune lora packed", "zerotune lora padding-free, whole batch a pass"):
        assert by_name[name]["padding_fraction"] == 0.0, name  # ours carry none
    assert "| zerotune lora packed |" in (tmp_path / "throughput.md").read_text()
    assert (tmp_path / "throughput.png").stat().st_size > 0


def test_padding_estimate():
    assert estimated_padding([4, 4, 4, 4], 2) == 0
    assert abs(estimated_padding([1, 3], 2) - (1 - 4 / 6)) < 1e-12


def test_gpu_check_script_runs_its_cpu_smoke_mode(capsys):
    from benchmarks.gpu_check import main as gpu_check

    assert gpu_check(["--size", "tiny", "--steps", "2", "--cutoff", "256", "--vocab", "512"]) == 0
    out = capsys.readouterr().out
    assert "real tokens/s" in out and "MFU" in out and "zerotune_segments attention" in out


def test_quick_dpo_benchmark_writes_its_rows(tmp_path):
    from benchmarks.dpo import main as dpo_bench

    assert dpo_bench(["--quick", "--pairs", "4", "--only", "defaults,sharing off", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "dpo.json").read_text())
    rows = {r["name"]: r for r in data["results"]}
    assert list(rows) == ["zerotune dpo (defaults: prefix sharing, padding-free)", "zerotune dpo, prefix sharing off"]
    slots = data["token_slots"]
    assert slots["shared"] < slots["real"] < slots["padded"]  # each prompt once < both sequences < padded batches
    assert all(r["pairs_per_second"] > 0 and abs(r["first_loss"] - 0.6931) < 1e-3 for r in rows.values())
    assert "| zerotune dpo, prefix sharing off |" in (tmp_path / "dpo.md").read_text()


def test_quick_step_profile_groups_the_ops(tmp_path):
    import re

    from benchmarks.profile_step import group_of, main as profile

    assert profile(["--quick", "--warmup", "1", "--steps", "2", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "profile_step_quick.md").read_text()
    shares = [float(s) for s in re.findall(r"\| [a-z ]+ \| [0-9.]+ \| ([0-9.]+)% \|", text.split("| op |")[0])]
    assert "| matmul |" in text and abs(sum(shares) - 100) < 0.5
    assert group_of("aten::mm") == "matmul" and group_of("aten::_to_copy") == "dtype casts and copies"
