"""stage grpo (TRL's GRPO with TRL's keys): each loss_type and importance-sampling level against the formula TRL
documents, written out here element by element; the ratio with num_iterations 1; scale_rewards by hand; the group
sampler; the prompts data kind; reward_funcs called TRL's way and logged per function; beta 0 loading no reference and
beta > 0 starting at KL exactly 0; the refusals. End-to-end runs are few and short (the tiny model, 1-2 steps)."""

import json
import math

import pytest
import torch

from tiny import alpaca_rows, base_config, train_with, write_dataset_dir

from trainer.model import grpo_losses as gl

REWARDS = '''
import json, os

SEEN = os.path.join(os.path.dirname(__file__), "seen.jsonl")

def vowels(prompts, completions, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts]

def recorder(prompts, completions, completion_ids, trainer_state, **columns):
    scores = [float(len(ids) % 3) if i % 4 else None for i, ids in enumerate(completion_ids)]
    with open(SEEN, "a") as f:
        f.write(json.dumps({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                            "state": type(trainer_state).__name__, "columns": columns, "scores": scores}) + "\\n")
    return scores

def named_only(prompts, solution):
    return [float(s == "yes") for s in solution]

def picky(prompts, completions, **kwargs):
    for p in prompts:
        if "Question 5:" in (p if isinstance(p, str) else p[-1]["content"]):
            raise KeyError("no rule for question 5")
    return [0.0] * len(prompts)
'''


# ---- the formulas ---------------------------------------------------------------------------------------------------
def _trl_loss(batches, loss_type, level, eps_low, eps_high, delta, beta, max_len, bias_corrected=True):
    """TRL's documented GRPO loss over one optimizer step of micro-batches, element by element: w = pi / pi_old per
    token, or exp(mean log-ratio) per completion (sequence); l = -min(min(w, delta) A, clip(w, 1 - eps_low,
    1 + eps_high) A) + beta (exp(ref - logp) - (ref - logp) - 1) (x w when bias-corrected); then per loss_type:
    grpo the completions' means of their token means, bnpo the micro-batch's token mean, dr_grpo the sum over
    (completions x max_completion_length), each averaged over the accumulated micro-batches; dapo the sum over every
    token of the step divided by their count."""
    all_tokens = sum(float(b["mask"].sum()) for b in batches)
    total = 0.0
    for b in batches:
        logp, old, adv, mask, ref = b["logps"], b["old"], b["adv"], b["mask"], b["ref"]
        rows, width = logp.shape
        sums, counts = [], []
        for i in range(rows):
            n = float(mask[i].sum())
            seq_w = torch.exp(sum((logp[i, t] - old[i, t]) * mask[i, t] for t in range(width)) / max(n, 1.0))
            s = 0.0
            for t in range(width):
                w = seq_w if level == "sequence" else torch.exp(logp[i, t] - old[i, t])
                capped = w if delta is None else torch.clamp(w, max=delta)
                clipped = torch.clamp(w, 1 - eps_low, 1 + eps_high)
                term = -torch.minimum(capped * adv[i], clipped * adv[i])
                if beta:
                    d = ref[i, t] - logp[i, t]
                    term = term + beta * (torch.exp(d) - d - 1) * (w if bias_corrected else 1.0)
                s = s + term * mask[i, t]
            sums.append(s)
            counts.append(n)
        if loss_type == "grpo":
            part = sum(s / max(n, 1.0) for s, n in zip(sums, counts)) / rows / len(batches)
        elif loss_type == "bnpo":
            part = sum(sums) / max(sum(counts), 1.0) / len(batches)
        elif loss_type == "dr_grpo":
            part = sum(sums) / (rows * max_len) / len(batches)
        else:
            part = sum(sums) / all_tokens
        total = total + part
    return total


def _ours(batches, loss_type, level, eps_low, eps_high, delta, beta, max_len, bias_corrected=True):
    """The stage's composition: policy_terms, the KL, aggregate; the engine's sum of loss_sums over the sum of
    items."""
    sums, items = 0.0, 0.0
    for b in batches:
        terms = gl.policy_terms(b["logps"], b["old"], b["adv"], b["mask"], eps_low, eps_high, delta, level)
        per_token = terms.loss
        if beta:
            kl = gl.kl_k3(b["logps"], b["ref"])
            per_token = per_token + beta * (kl * terms.weight if bias_corrected else kl)
        s, n = gl.aggregate(per_token, b["mask"], loss_type, max_len)
        sums, items = sums + s, items + n
    return sums / items


def _random_batches(seed, micro_batches=2, rows=4, width=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(micro_batches):
        lengths = torch.randint(1, width + 1, (rows,), generator=g)
        lengths[:2] = torch.randint(3, width + 1, (2,), generator=g)  # a long completion of each sign
        mask = (torch.arange(width)[None, :] < lengths[:, None]).double()
        logps = (-torch.rand(rows, width, generator=g, dtype=torch.float64) * 3).requires_grad_()
        old = (logps.detach() + 0.5 * torch.randn(rows, width, generator=g, dtype=torch.float64))
        ref = logps.detach() + 0.3 * torch.randn(rows, width, generator=g, dtype=torch.float64)
        adv = torch.rand(rows, generator=g, dtype=torch.float64) + 0.1
        adv[1::2] *= -1  # both signs, so both clip bounds can win
        out.append({"logps": logps, "old": old, "adv": adv, "mask": mask, "ref": ref})
    return out


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
@pytest.mark.parametrize("knobs", [dict(eps_low=0.2, eps_high=0.2, delta=None, beta=0.0),
                                   dict(eps_low=0.2, eps_high=0.28, delta=1.5, beta=0.04),
                                   dict(eps_low=0.1, eps_high=0.3, delta=None, beta=0.1, bias_corrected=False)])
def test_each_loss_type_and_level_is_trls_formula(loss_type, level, knobs):
    """Loss and gradient equal the element-by-element formula over a step of two micro-batches, with random
    log-probs far enough from the old ones that both clip bounds and delta engage."""
    batches = _random_batches(seed=sum(map(ord, loss_type + level)))
    expected = _trl_loss(batches, loss_type, level, max_len=7, **knobs)
    grads = torch.autograd.grad(expected, [b["logps"] for b in batches])
    got = _ours(batches, loss_type, level, max_len=7, **knobs)
    ours = torch.autograd.grad(got, [b["logps"] for b in batches])
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-10, abs=1e-12)
    for a, b in zip(ours, grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    if level == "token":  # the case is not idle: both bounds clip somewhere, and delta caps when set
        terms = [gl.policy_terms(b["logps"], b["old"], b["adv"], b["mask"], knobs["eps_low"], knobs["eps_high"],
                                 knobs["delta"]) for b in batches]
        assert sum(float((t.low_clipped * b["mask"]).sum()) for t, b in zip(terms, batches)) > 0
        assert sum(float((t.high_clipped * b["mask"]).sum()) for t, b in zip(terms, batches)) > 0
        if knobs["delta"]:
            assert any(bool(((t.weight > knobs["delta"]) * b["mask"]).any()) for t, b in zip(terms, batches))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_on_policy_the_ratio_is_exactly_one_and_clipping_is_idle(level):
    """num_iterations 1 (one generation a step): the old log-probs are the current ones detached, so w is exactly
    1 and the clipped loss, its value and its gradient, is the unclipped -w A."""
    b = _random_batches(seed=3, micro_batches=1)[0]
    terms = gl.policy_terms(b["logps"], b["logps"].detach(), b["adv"], b["mask"], 0.2, 0.28, 1.5, level)
    assert torch.equal(terms.weight, torch.ones_like(terms.weight)) and terms.low_clipped.sum() == 0
    assert terms.high_clipped.sum() == 0
    unclipped = -terms.weight * b["adv"][:, None]
    torch.testing.assert_close(terms.loss, unclipped, rtol=0, atol=0)
    g_clipped = torch.autograd.grad((terms.loss * b["mask"]).sum(), b["logps"], retain_graph=True)[0]
    g_plain = torch.autograd.grad((unclipped * b["mask"]).sum(), b["logps"])[0]
    torch.testing.assert_close(g_clipped, g_plain, rtol=0, atol=0)


def test_the_loss_normalisations_count_what_trl_divides_by():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    per_token = torch.tensor([[1.0, 3.0, 100.0], [2.0, 2.0, 5.0]], dtype=torch.float64)
    assert [float(x) for x in gl.aggregate(per_token, mask, "grpo", 8)] == [2.0 + 3.0, 2.0]
    assert [float(x) for x in gl.aggregate(per_token, mask, "bnpo", 8)] == [13.0 / 5, 1.0]
    assert [float(x) for x in gl.aggregate(per_token, mask, "dr_grpo", 8)] == [13.0 / 8, 2.0]
    assert [float(x) for x in gl.aggregate(per_token, mask, "dapo", 8)] == [13.0, 5.0]
    assert [float(gl.items_of(mask, t)) for t in ("grpo", "bnpo", "dr_grpo", "dapo")] == [2.0, 1.0, 2.0, 5.0]


# ---- rewards into advantages ---------------------------------------------------------------------------------------
def test_scale_rewards_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two groups of three
    sd = 1.0  # the first group's unbiased standard deviation
    group, std = gl.advantages(rewards, 3, "group")
    torch.testing.assert_close(group, torch.tensor([-1 / (sd + 1e-4), 0.0, 1 / (sd + 1e-4), 0.0, 0.0, 0.0]))
    torch.testing.assert_close(std, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
    mean = sum(rewards.tolist()) / 6
    batch_sd = math.sqrt(sum((r - mean) ** 2 for r in rewards.tolist()) / 5)
    batch, _ = gl.advantages(rewards, 3, "batch")
    torch.testing.assert_close(batch, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (batch_sd + 1e-4))
    given, _ = gl.advantages(rewards, 3, "batch", batch_std=2.0)  # every process's standard deviation
    torch.testing.assert_close(given, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (2.0 + 1e-4))
    none, _ = gl.advantages(rewards, 3, "none")
    torch.testing.assert_close(none, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def test_rewards_combine_with_weights_and_none_stays_out():
    per_function = torch.tensor([[1.0, float("nan")], [0.0, 2.0], [float("nan"), float("nan")], [3.0, 1.0]])
    combined = gl.combine_rewards(per_function, torch.tensor([1.0, 0.5]))
    assert combined[:2].tolist() == [1.0, 1.0] and math.isnan(combined[2]) and combined[3] == 3.5
    adv, _ = gl.advantages(combined, 4, "none")  # the unscored completion: out of the mean, advantage 0
    mean = (1.0 + 1.0 + 3.5) / 3
    torch.testing.assert_close(adv, torch.tensor([1.0 - mean, 1.0 - mean, 0.0, 3.5 - mean]))


def test_the_high_entropy_mask_keeps_the_top_quantile():
    entropy = torch.tensor([[0.1, 0.5, 0.9, 0.0], [0.3, 0.7, 0.2, 0.4]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    kept = gl.high_entropy_mask(entropy, mask, 1 - 0.5)  # top_entropy_quantile 0.5 of 7 tokens
    threshold = float(torch.quantile(torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7, 0.2, 0.4]), 0.5))
    assert threshold == pytest.approx(0.4)
    assert kept.tolist() == [[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]


# ---- the sampler and the data --------------------------------------------------------------------------------------
def test_the_group_sampler_gives_each_process_whole_groups_and_repeats_them():
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from trainer.stages.rollout_sampler import GroupSampler

    # 2 processes x 4 completions a micro-batch x 2 micro-batches a generation = 16 completions = 4 prompts x 4
    sampler = GroupSampler(10, batch_size=4, accumulation=2, world=2, buffer_steps=1, repeats=2, seed=1, group=4)
    assert (sampler.prompts, sampler.buffers, len(sampler)) == (4, 3, 3 * 16 * 2)
    keys = list(sampler)
    for rank in range(2):
        batches = list(BatchSamplerShard(BatchSampler(keys, 4, False), num_processes=2, process_index=rank))
        for buffer in range(3):
            mine = [tuple(k) for b in batches[buffer * 4:(buffer + 1) * 4] for k in b]
            first, second = mine[:8], mine[8:]
            assert first == second  # num_iterations: the same completions, in the same order
            assert [(k[2], k[3]) for k in first] == sampler.share(0, buffer, rank)
            prompts = [k[3] for k in first]
            assert prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4  # whole groups of 4
    drawn = {k[3] for k in keys}
    assert drawn == set(range(10))


def test_prompts_without_answers_are_the_template_up_to_the_answer(tiny_tokenizer, tmp_path):
    """A prompt-only row (alpaca without output, a conversation ending with the user) gives the same prompt ids as
    the same row with an answer; its other columns travel as they are; conversational rows carry their messages."""
    from trainer.data.processing import process_rows
    from trainer.data.registry import DatasetSpec
    from trainer.data.templates import get_template
    from trainer.data.options import DataArguments
    from trainer.stages import grpo_data

    template = get_template("chatml", tiny_tokenizer, DataArguments())
    args = DataArguments(cutoff_len=64)
    alpaca = DatasetSpec("sums", "file", "x.json")
    rows = {"instruction": ["What is 2+3?", "What is 2+3?"], "input": ["", ""], "output": ["5", None],
            "solution": ["5", "5"], "_row": [1, 2]}
    out = process_rows(rows, alpaca, grpo_data.KIND, tiny_tokenizer, template, args)
    assert out["_error"] == ["", ""] and out["input_ids"][0] == out["input_ids"][1]
    assert all(label == -100 for label in out["labels"][0])
    text = tiny_tokenizer.decode(out["input_ids"][0])
    assert text.endswith("<|im_start|>assistant\n") and "What is 2+3?" in text
    carried = json.loads(out[grpo_data.COLUMN][1])
    assert carried == {"columns": {"output": None, "solution": "5"}, "prompt": "What is 2+3?", "source": "sums row 2"}
    chat = DatasetSpec("chat", "file", "c.json", formatting="sharegpt")
    turns = [[{"from": "human", "value": "Hi?"}], [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Yo"}]]
    out = process_rows({"conversations": turns, "answer": ["a", "b"], "_row": [1, 2]}, chat, grpo_data.KIND,
                       tiny_tokenizer, template, args)
    assert out["input_ids"][0] == out["input_ids"][1]
    assert json.loads(out[grpo_data.COLUMN][0])["prompt"] == [{"role": "user", "content": "Hi?"}]
    long = process_rows({"instruction": ["word " * 200], "output": ["x"], "_row": [1]}, alpaca, grpo_data.KIND,
                        tiny_tokenizer, template, args)
    assert len(long["input_ids"][0]) == 64 and long["_truncated"] == [True]  # its last 64 tokens
    assert tiny_tokenizer.decode(long["input_ids"][0]).endswith("<|im_start|>assistant\n")


def test_a_reward_function_that_raises_names_itself_and_the_row(tmp_path):
    from trainer.stages.grpo_rewards import RewardFunction, RewardFunctionError

    (tmp_path / "r.py").write_text(REWARDS)
    fn = RewardFunction(f"{tmp_path}/r.py:picky")
    prompts = [f"Question {i}: say words." for i in range(8)]
    kwargs = {"prompts": prompts, "completions": ["x"] * 8, "completion_ids": [[1]] * 8}
    with pytest.raises(RewardFunctionError, match=r"reward function picky \(.*r.py:picky\) raised KeyError: "
                                                  r"'no rule for question 5'\n  on alpaca row 6 \(prompt 'Question 5:"):
        fn(kwargs, 8, lambda i: f"alpaca row {i + 1} (prompt {prompts[i]!r})")
    only = RewardFunction(f"{tmp_path}/r.py:named_only")  # no **kwargs: only what it names
    assert only({**kwargs, "solution": ["yes", "no"] * 4}, 8, str).tolist() == [1.0, 0.0] * 4


# ---- end to end ----------------------------------------------------------------------------------------------------
@pytest.fixture()
def sums_dir(tmp_path):
    rows = [{**row, "solution": "yes" if i % 2 else "no"} for i, row in enumerate(alpaca_rows(16))]
    for row in rows[::3]:
        row["output"] = ""  # prompts without an answer train too
    folder = write_dataset_dir(tmp_path / "sums", rows, sharegpt_rows=[
        {"conversations": [{"from": "human", "value": f"Say {i} words."}], "system": "Be brief.", "answer": str(i)}
        for i in range(8)])
    (folder / "rewards.py").write_text(REWARDS)
    return folder


def _grpo(model_dir, data_dir, out, **kw):
    settings = dict(stage="grpo", reward_funcs=f"{data_dir}/rewards.py:vowels", max_completion_length=6,
                    per_device_train_batch_size=8, gradient_accumulation_steps=1, num_generations=4, max_steps=2,
                    logging_steps=1, learning_rate=1e-2)
    return base_config(model_dir, data_dir, out, **{**settings, **kw})


@pytest.fixture()
def counted(monkeypatch):
    """How many models a run loads (from_pretrained) and copies for a reference, and the stage it built."""
    from transformers import PreTrainedModel

    import trainer.model.reference as reference
    from trainer.stages.grpo import GRPO

    seen = {"loaded": 0, "copies": 0, "stage": None}
    load, copy, prepare = PreTrainedModel.from_pretrained.__func__, reference.starting_copy, GRPO.prepare

    def loading(cls, *a, **k):
        seen["loaded"] += 1
        return load(cls, *a, **k)

    def copying(*a, **k):
        seen["copies"] += 1
        return copy(*a, **k)

    def preparing(self, *a, **k):
        seen["stage"] = self
        return prepare(self, *a, **k)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(loading))
    monkeypatch.setattr(reference, "starting_copy", copying)
    monkeypatch.setattr(GRPO, "prepare", preparing)
    return seen


def test_beta_zero_loads_no_reference(tiny_model_dir, sums_dir, tmp_path, counted):
    """TRL's default beta 0: full fine-tuning, where a reference would be a whole frozen copy, holds one model."""
    _, state = train_with(_grpo(tiny_model_dir, sums_dir, tmp_path / "out", finetuning_type="full", max_steps=1))
    stage = counted["stage"]
    assert (counted["loaded"], counted["copies"]) == (1, 0)
    assert stage.reference is None and stage.reference_adapter is None and not stage.uses_reference
    first = state["log_history"][0]
    assert "kl" not in first and first["completions/mean_length"] > 0


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_beta_gives_kl_exactly_zero_at_step_zero(tiny_model_dir, sums_dir, tmp_path, counted, finetuning_type):
    """Before the first update the policy is its reference (the LoRA base with the adapters off, or the frozen copy
    of full fine-tuning): KL is exactly 0 over the whole first step (two micro-batches), then moves. The first step
    logs TRL's figures, the clip ratios exactly 0 (one generation a step: ratio 1)."""
    _, state = train_with(_grpo(tiny_model_dir, sums_dir, tmp_path / "out", beta=0.04, finetuning_type=finetuning_type,
                                per_device_train_batch_size=4, gradient_accumulation_steps=2))
    assert (counted["loaded"], counted["copies"]) == (1, 1 if finetuning_type == "full" else 0)
    first, second = state["log_history"][:2]
    assert first["kl"] == 0 and second["kl"] > 0
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "rewards/vowels/mean", "rewards/vowels/std", "completions/max_length", "completions/min_length"):
        assert key in first, key
    assert first["clip_ratio/low_mean"] == first["clip_ratio/high_mean"] == 0 and 0 <= first["reward"] <= 1


@pytest.mark.parametrize("dataset", ["alpaca", "chat"])
def test_reward_funcs_get_trls_arguments_and_are_logged_each(tiny_model_dir, sums_dir, tmp_path, dataset):
    """Each reward function gets prompts, completions, completion_ids, trainer_state and the row's other columns
    (strings for plain data, messages for a conversation); each is logged under its name, and the logged reward
    is their weighted sum (a None left out of its function's mean)."""
    _, state = train_with(_grpo(tiny_model_dir, sums_dir, tmp_path / "out", dataset=dataset, max_steps=1,
                                reward_funcs=f"{sums_dir}/rewards.py:vowels,{sums_dir}/rewards.py:recorder",
                                reward_weights=[1.0, 0.5]))
    seen = [json.loads(line) for line in (sums_dir / "seen.jsonl").read_text().splitlines()]
    assert len(seen) == 1
    call = seen[0]
    n = len(call["completion_ids"])
    assert n == 8 and call["state"] == "TrainerState"
    assert len(call["prompts"]) == len(call["completions"]) == n
    if dataset == "alpaca":
        assert set(call["columns"]) == {"output", "solution"} and all(isinstance(p, str) for p in call["prompts"])
        assert all(p.startswith("Question") for p in call["prompts"]) and isinstance(call["completions"][0], str)
    else:
        assert set(call["columns"]) == {"answer"}
        assert call["prompts"][0][0] == {"role": "system", "content": "Be brief."}
        assert call["prompts"][0][1]["role"] == "user" and call["completions"][0][0]["role"] == "assistant"
    assert call["prompts"][0] == call["prompts"][3] != call["prompts"][4]  # groups of num_generations
    first = state["log_history"][0]
    scores = [s for s in call["scores"] if s is not None]
    assert first["rewards/recorder/mean"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)
    assert "rewards/vowels/mean" in first and "rewards/vowels/std" in first
    expected = first["rewards/vowels/mean"] + 0.5 * sum(call["scores"][i] or 0.0 for i in range(n)) / n
    assert first["reward"] == pytest.approx(expected, abs=1e-5)


def test_num_iterations_trains_one_generation_twice(tiny_model_dir, sums_dir, tmp_path):
    """num_iterations 2: the second step trains the first step's completions again (no new generation, nothing new
    logged of it), against the old log-probs kept from the generation, which no longer match the moved policy."""
    out = tmp_path / "out"
    _, state = train_with(_grpo(tiny_model_dir, sums_dir, out, num_iterations=2, epsilon=0.01))
    first, second = state["log_history"][:2]
    assert "reward" in first and "reward" not in second
    assert first["clip_ratio/region_mean"] == 0 and second["clip_ratio/region_mean"] > 0
    assert json.loads((out / "grpo_state.json").read_text())["rollouts"] == 1


@pytest.mark.parametrize("overrides,message", [
    ({"reward_funcs": None}, "stage grpo needs reward_funcs"),
    ({"use_vllm": True}, "use_vllm: vLLM generation is not supported"),
    ({"loss_type": "sapo"}, "loss_type: sapo is TRL's, not implemented here"),
    ({"scale_rewards": "sometimes"}, "scale_rewards: 'sometimes' is not allowed"),
    ({"num_generations": 3}, "num_generations 3 must divide the completions each process trains"),
    ({"steps_per_generation": 3, "gradient_accumulation_steps": 2}, "steps_per_generation 3 must be a multiple"),
    ({"generation_batch_size": 16, "steps_per_generation": 2}, "Set generation_batch_size or steps_per_generation"),
    ({"generation_batch_size": 12}, "generation_batch_size: 12 must be a multiple of the global batch"),
    ({"max_new_tokens": 9}, "max_new_tokens: 9 and max_completion_length: 6"),
    ({"reward_weights": [1.0, 2.0]}, "reward_weights: 2 weights for 1 reward_funcs"),
    ({"do_sample": False}, "stage grpo needs do_sample: true"),
    ({"beta": -1}, "beta: -1.0 must be non-negative"),
    ({"multi_objective_aggregation": "normalize_then_sum"}, "only sum_then_normalize"),
    ({"reward_funcs": "{data}/rewards.py:nothing"}, "reward_funcs: .*rewards.py' has no callable 'nothing'"),
    ({"reward_funcs": "{data}"}, "reward_funcs: .* is a folder without value_head.safetensors"),
])
def test_refusals_name_the_key(tiny_model_dir, sums_dir, tmp_path, overrides, message):
    from trainer.errors import ConfigError
    from trainer.run import build_config

    overrides = {k: (v.format(data=sums_dir) if isinstance(v, str) else v) for k, v in overrides.items()}
    cfg = {k: v for k, v in {**_grpo(tiny_model_dir, sums_dir, tmp_path / "o"), **overrides}.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        build_config(cfg)


def test_trls_defaults_and_sampling(tiny_model_dir, sums_dir, tmp_path):
    """TRL's GRPOConfig defaults where the YAML is silent: temperature 1, top_p 1, top_k 0, 512 new tokens, beta 0,
    dapo, token level, group scaling, epsilon 0.2; max_new_tokens alone (LLaMA-Factory's name) sets the length."""
    from trainer.run import build_config

    cfg = _grpo(tiny_model_dir, sums_dir, tmp_path / "o")
    del cfg["max_completion_length"]
    config = build_config(cfg)
    g, o = config.generation, config.stage_options
    assert (g.temperature, g.top_p, g.top_k, g.max_new_tokens) == (1.0, 1.0, 0, 512)
    assert (o.beta, o.loss_type, o.importance_sampling_level, o.scale_rewards, o.epsilon, o.num_iterations) == \
        (0.0, "dapo", "token", "group", 0.2, 1)
    assert build_config({**cfg, "max_new_tokens": 32}).stage_options.max_completion_length == 32
    assert build_config({**cfg, "scale_rewards": False}).stage_options.scale_rewards == "none"


def test_mask_truncated_completions_leaves_them_out_of_the_items():
    """A completion that never reached a stop token trains nothing under mask_truncated_completions: dapo's items
    (tokens) leave it out; grpo's (completions) still count it, as TRL's mean over the batch does."""
    from trainer.stages.grpo import GRPO, GRPOOptions
    from trainer.stages.rollouts import Sample

    def items(**kw):
        stage = GRPO(options=GRPOOptions(reward_funcs=["r:f"], **kw))
        stage.stop_ids = [9]
        stage.experience = {(0, 0, 0, 0): [Sample([1], [5, 6, 9], [])], (0, 0, 1, 0): [Sample([1], [5, 6, 7, 8], [])]}
        return float(stage.count_items({"rollout_keys": torch.tensor([[0, 0, 0, 0], [0, 0, 1, 0]])}))

    assert items() == 7 and items(mask_truncated_completions=True) == 3
    assert items(mask_truncated_completions=True, loss_type="grpo") == 2
    assert items(loss_type="bnpo") == 1


def test_an_rm_output_among_the_reward_funcs(tiny_model_dir, pairs_dir, sums_dir, tmp_path):
    """An rm run's LoRA output scores completions as an adapter of the policy, logged under its folder's name
    beside a function; with weights 1 and 0 the reward is the model's alone."""
    rm = tmp_path / "rm-lora"
    train_with(base_config(tiny_model_dir, pairs_dir, rm, stage="rm", dataset="pairs", max_steps=2))
    _, state = train_with(_grpo(tiny_model_dir, sums_dir, tmp_path / "out", max_steps=1, reward_weights="1,0",
                                reward_funcs=f"{rm},{sums_dir}/rewards.py:vowels"))
    first = state["log_history"][0]
    assert first["reward"] == pytest.approx(first["rewards/rm-lora/mean"], abs=1e-5)
    assert math.isfinite(first["rewards/rm-lora/std"]) and first["rewards/rm-lora/std"] > 0
    assert "rewards/vowels/mean" in first


# ---- the group's prompt computed once ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["segments", "flash-attn 2.6.3"])
@pytest.mark.parametrize("group", [2, 4, 8])
def test_a_groups_shared_prompt_gives_each_completion_its_separate_log_probs(path, group, tiny_model_dir,
                                                                             monkeypatch):
    """Each prompt computed once a group (the 2nd..Gth completions attending to the first one's prompt, positions
    continuing from it) gives every completion token the log-prob and entropy of an unpadded forward of that
    prompt + completion alone (fp32), on zerotune_segments' SDPA and on its FlashAttention-2 varlen call (a
    pure-torch stand-in, tests/flash_standin.py, as test_dpo's pairs); a 1-token prompt shares nothing and still
    agrees. Without the shared-prefix layout the same row is wrong."""
    import functools
    import importlib.metadata
    import sys

    from transformers import AutoModelForCausalLM

    import flash_standin
    from trainer.model import kernels
    from trainer.model.wrapper import ModelWrapper
    from trainer.stages.rollouts import Sample, collate

    kernels.register()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=kernels.SEGMENTS)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    if path.startswith("flash-attn"):
        release = path.split()[1]
        real_version = importlib.metadata.version
        monkeypatch.setitem(sys.modules, "flash_attn", flash_standin.flash_attn_module(release))
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda name: release if name == "flash-attn" else real_version(name))
        # kernels' own probe (import, release, a smoke call of the stand-in), run on the CPU: CUDA is what it lacks
        monkeypatch.setattr(kernels, "flash_status", functools.cache(lambda: kernels._probe_flash("cpu")))
        monkeypatch.setattr(kernels, "_flash_device", lambda query: True)
        assert kernels.flash_status().usable  # probed once (its smoke call), before the calls are counted
    flash_standin.CALLS.clear()
    g = torch.Generator().manual_seed(group)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [12, 13, 14]]
    samples = [Sample(p, torch.randint(20, 60, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist(),
                      []) for p in prompts for _ in range(group)]
    temperature = 0.7
    with torch.no_grad():
        expected = {"logps": [], "entropy": []}
        for s in samples:
            logits = model(input_ids=torch.tensor([s.prompt + s.response])).logits[0].float() / temperature
            logp = torch.log_softmax(logits, dim=-1)
            for i, token in enumerate(s.response):
                at = len(s.prompt) - 1 + i
                expected["logps"].append(logp[at, token])
                expected["entropy"].append(-(logp[at].exp() * logp[at]).sum())
        batch = collate(samples, "cpu", share_groups=True)
        every = sum(len(s.prompt) + len(s.response) for s in samples)
        assert batch["input_ids"].shape[1] == every - (group - 1) * (6 + 0 + 2)  # each prompt but its last token once
        wrapper = ModelWrapper(model)
        out = wrapper.policy_outputs(model, batch, None, temperature, entropy=True)
        for name, values in expected.items():
            torch.testing.assert_close(out[name][out["mask"]], torch.stack(values), rtol=1e-5, atol=1e-5)
        if path.startswith("flash-attn"):
            call = flash_standin.CALLS[-1]
            assert not torch.equal(call["cu_seqlens_q"], call["cu_seqlens_k"])  # the shared keys went in
        else:
            assert not flash_standin.CALLS
        del batch["shared_prefix"]
        wrong = wrapper.policy_outputs(model, batch, None, temperature)
    assert (wrong["logps"][wrong["mask"]] - torch.stack(expected["logps"])).abs().max() > 1e-2


def test_prefix_sharing_trains_exactly_like_separate_prompts(tiny_model_dir, sums_dir, tmp_path, caplog):
    """grpo_prefix_sharing (on by default) changes what is computed, not the result: the same losses, KL (0 at step
    0 either way) and entropy as grpo_prefix_sharing: false, with a reference and the old log-probs in play."""
    runs = {}
    for share in (True, False):
        caplog.clear()
        with caplog.at_level("INFO"):
            _, state = train_with(_grpo(tiny_model_dir, sums_dir, tmp_path / str(share), beta=0.04, num_iterations=2,
                                        grpo_prefix_sharing=share))
        assert ("each prompt is computed once a group" in caplog.text) == share
        runs[share] = [e[k] for e in state["log_history"][:2] for k in ("loss", "kl", "entropy")]
    assert runs[True][1] == 0 and runs[True][4] > 0
    assert runs[True] == pytest.approx(runs[False], rel=1e-4, abs=1e-7)


def _assert_resumed_like(reference: dict, out, last_step: int | None = None) -> None:
    """After the step-3 checkpoint, the resumed run in `out` logged the uninterrupted run's loss, kl, reward and
    entropy; with last_step, up to that step (the reward is logged at the generation before it)."""
    resumed = json.loads((out / "trainer_state.json").read_text())
    for key in ("loss", "kl", "reward", "entropy"):
        want = {e["step"]: e[key] for e in reference["log_history"] if key in e}
        got = {e["step"]: e[key] for e in resumed["log_history"] if key in e}
        later = [s for s in want if s > 3]
        assert later, key
        if last_step is not None:
            assert later[-1] == last_step - (key == "reward"), key
        for s in later:
            assert got[s] == pytest.approx(want[s], rel=1e-4, abs=1e-6), (key, s)


def test_a_killed_run_resumes_mid_generation_exactly(tiny_model_dir, sums_dir, tmp_path):
    """Killed (SIGKILL) after a checkpoint that falls between a generation's two passes (num_iterations 2):
    resumed, it trains the second pass on the very completions it sampled (each process saved its own) and
    samples the next generation from that generation's own seed, so every later figure is the uninterrupted run's."""
    import signal

    from test_reliability import _drive

    settings = dict(max_steps=6, beta=0.04, num_iterations=2)
    _, reference = train_with(_grpo(tiny_model_dir, sums_dir, tmp_path / "straight", **settings))
    killed = tmp_path / "killed"
    cfg = _grpo(tiny_model_dir, sums_dir, killed, save_steps=3, **settings)
    patch = """
        original = ZeroTrainer.training_step
        def step(self, *args, **kwargs):
            if self.state.global_step == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *args, **kwargs)
        ZeroTrainer.training_step = step
    """
    proc = _drive(tmp_path, cfg, patch)
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "checkpoint-3" / "grpo_experience_0.pt").is_file()
    proc = _drive(tmp_path, cfg, "", "resume_from_checkpoint=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_resumed_like(reference, killed)


# ---- each prompt prefilled once in generation ------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "segments"])
def test_a_shared_prefill_samples_what_separate_prefills_do(tiny_model_dir, attention):
    """group G with shared_prefill (one forward of each prompt, its KV cache repeated G times) gives the tokens of
    G separate copies of the prompt prefilled in the same batch, from the same seed: sampled (every step draws one
    batch of the same rows) and greedy, left-padded prompts of 8, 1 and 3 tokens together, on plain SDPA and on
    zerotune_segments (grpo's attention path). Greedy, each prompt's completion is also the one it gets alone (which
    the cached keys' positions decide: generate's own for a left-padded row)."""
    from transformers import AutoModelForCausalLM

    from trainer.generation import GenerationSettings, generate
    from trainer.model import kernels

    kernels.register()
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=kernels.SEGMENTS if attention == "segments" else "sdpa")
    with torch.no_grad():  # sharper than the initial weights, so that a wrong key changes the tokens
        for p in model.parameters():
            p.normal_(0, 0.5)
    prompts, group = [[5, 6, 7, 8, 9, 10, 11, 12], [11], [12, 13, 14]], 4
    for sampled in (True, False):
        settings = GenerationSettings(max_new_tokens=12, do_sample=sampled, temperature=1.0, top_p=1.0, top_k=0)
        runs = []
        for shared in (True, False):
            torch.manual_seed(7)
            runs.append(generate(model, prompts, [1], 0, settings, group=group, shared_prefill=shared))
        assert len(runs[0]) == len(prompts) * group and runs[0] == runs[1]
        if sampled:
            assert len({tuple(r) for r in runs[0][:group]}) > 1  # a group's samples differ
        else:
            alone = [generate(model, [p], [1], 0, settings)[0] for p in prompts]
            assert runs[0] == [a for a in alone for _ in range(group)]
    # chunks of whole groups (batch_size counts samples) and one-token prompts only (nothing to share)
    settings = GenerationSettings(max_new_tokens=5, do_sample=False)
    whole = generate(model, prompts, [1], 0, settings, group=group)
    assert generate(model, prompts, [1], 0, settings, batch_size=8, group=group) == whole
    assert whole == [r[:5] for r in runs[0]]
    assert generate(model, [[11], [3]], [1], 0, settings, group=2) == \
        generate(model, [[11], [3]], [1], 0, settings, group=2, shared_prefill=False)


# ---- the example ------------------------------------------------------------------------------------------------------
def test_the_grpo_example_validates_and_reads_its_prompts(tiny_model_dir, monkeypatch):
    """examples/grpo_lora.yaml as `zerotune check` reads it (on the tiny model): stage grpo with its reward function,
    the arithmetic prompts through the prompts data kind, 2 prompts x 8 completions a step."""
    from pathlib import Path

    from trainer.plan import describe
    from trainer.run import load_config

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    cfg = load_config(str(root / "examples/grpo_lora.yaml"),
                      [f"model_name_or_path={tiny_model_dir}", "overwrite_output_dir=true"])
    opts = cfg.stage_options
    assert cfg.finetuning.stage == "grpo" and opts.num_generations == 8 and opts.beta == 0
    assert opts.reward_funcs == ["examples/grpo_rewards.py:exact_sum"]
    plan = describe(cfg)
    assert "What is 13 + 14? Answer with just the number." in plan


def test_the_example_reward_scores_right_wrong_and_unparseable_completions():
    """exact_sum: the last number written is the answer (1), another number (0), no number at all (0); plain and
    conversational completions alike, thousands commas read."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "grpo_rewards_example", Path(__file__).resolve().parents[1] / "examples/grpo_rewards.py")
    rewards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rewards)
    completions = ["27", "13 + 14 = 27.", "The answer is 26.", "twenty-seven", "", "27 or maybe 28", "1,200",
                   [{"role": "assistant", "content": "It is 33"}]]
    answers = ["27", "27", "27", "27", "27", "27", "1200", "33"]
    assert rewards.exact_sum(completions=completions, answer=answers, prompts=[""] * 8) == \
        [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]


def test_a_completion_with_its_own_seed_is_the_one_it_gets_alone(tiny_model_dir):
    """seeds (grpo: one a completion, from its slot): each sample draws from its own generator, so the group's G
    samples of a left-padded batch of prompts (8, 1 and 3 tokens), prefilled once, are token for token the G
    independent generations of each prompt alone with the same seeds; top-k / top-p and temperature as transformers
    applies them; a group's samples differ."""
    from transformers import AutoModelForCausalLM

    from trainer.generation import GenerationSettings, generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    prompts, group = [[5, 6, 7, 8, 9, 10, 11, 12], [11], [12, 13, 14]], 4
    seeds = [1000 + i for i in range(len(prompts) * group)]
    for knobs in (dict(temperature=1.0, top_p=1.0, top_k=0), dict(temperature=0.7, top_p=0.9, top_k=20)):
        settings = GenerationSettings(max_new_tokens=10, do_sample=True, **knobs)
        together = generate(model, prompts, [1], 0, settings, group=group, seeds=seeds)
        unshared = generate(model, prompts, [1], 0, settings, group=group, seeds=seeds, shared_prefill=False)
        alone = [generate(model, [p], [1], 0, settings, seeds=[seeds[i * group + j]])[0]
                 for i, p in enumerate(prompts) for j in range(group)]
        assert together == unshared == alone
        assert len({tuple(r) for r in together[:group]}) > 1


def test_own_draws_sample_the_tempered_truncated_softmax():
    """The per-sample draw (argmax of the processed scores plus Gumbel noise) picks each token as often as
    softmax(logits / temperature) restricted to the top-k says: 20000 draws against the probabilities."""
    from trainer.generation import GenerationSettings, _own_draws

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    settings = GenerationSettings(temperature=0.8, top_k=4, top_p=1.0)
    processors = _own_draws(settings, [3], "cpu")
    counts = torch.zeros(6)
    for _ in range(20000):
        counts[int(processors(torch.zeros(1, 1, dtype=torch.long), logits.clone()).argmax())] += 1
    expected = torch.softmax(torch.cat([logits[0, :4] / 0.8, torch.full((2,), -math.inf)]), dim=0)
    torch.testing.assert_close(counts / 20000, expected, atol=0.012, rtol=0)


# ---- processes and signals --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_give_one_process_losses(tiny_model_dir, sums_dir, tmp_path):
    """One generation of 4 prompts x 4 completions a step, trained twice (num_iterations 2, so the old log-probs are
    in play) with a KL to the reference: one process with all 16 completions, then two processes (DeepSpeed ZeRO-2,
    gloo) with 2 prompts' groups each. A completion's sampling seed is its slot in the generation, not its process,
    so both sample the same completions: the same losses, rewards, KL and entropy, step by step."""
    from test_distributed import ROOT, _deepspeed, _history

    common = dict(beta=0.04, num_iterations=2, max_steps=4, max_completion_length=6)
    single = tmp_path / "one"
    train_with(_grpo(tiny_model_dir, sums_dir, single, per_device_train_batch_size=16, **common))
    double = tmp_path / "two"
    proc = _deepspeed(_grpo(tiny_model_dir, sums_dir, double, per_device_train_batch_size=8,
                            deepspeed=str(ROOT / "ds_configs/ds_z2_config.json"), **common), tmp_path, "grpo-2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for key in ("loss", "reward", "kl", "entropy", "completions/mean_length"):
        one, two = _history(single, key), _history(double, key)
        assert one and two == pytest.approx(one, rel=1e-4, abs=1e-6), key  # rewards: at each of 2 generations
    assert _history(single, "kl")[0] == 0 and _history(single, "kl")[-1] != 0


@pytest.mark.slow
def test_sigterm_mid_generation_resumes_exactly(tiny_model_dir, sums_dir, tmp_path):
    """SIGTERM arriving while the second generation is being sampled (step 3 of 6; num_iterations 2): the run
    finishes that step, checkpoints and stops; resumed, it trains the generation's second pass on the completions it
    sampled and every later step as the uninterrupted run did."""
    import signal

    from test_reliability import _drive

    settings = dict(max_steps=6, beta=0.04, num_iterations=2)
    _, reference = train_with(_grpo(tiny_model_dir, sums_dir, tmp_path / "straight", **settings))
    stopped = tmp_path / "stopped"
    cfg = _grpo(tiny_model_dir, sums_dir, stopped, save_steps=100, **settings)
    patch = """
        import trainer.generation as generation
        original, calls = generation.generate, []
        def generating(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # what a cluster scheduler sends before preemption, mid-generation
                os.kill(os.getpid(), signal.SIGTERM)
            return original(*args, **kwargs)
        generation.generate = generating
    """
    proc = _drive(tmp_path, cfg, patch)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert sorted(p.name for p in stopped.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (stopped / "checkpoint-3" / "grpo_experience_0.pt").is_file()
    proc = _drive(tmp_path, cfg, "", "resume_from_checkpoint=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_resumed_like(reference, stopped, last_step=6)
