"""ppo and grpo end to end: the buffer order, the policy's log-probs/values against a plain forward, batched greedy
generation against one prompt at a time, step one on-policy (KL, ratio and clipping all exactly idle), the reward
rising on an easy property (gae and grpo), scores from an rm-stage output (lora and full), a killed run resuming,
and the refusals."""

import json
import statistics

import pytest
import torch

from tiny import alpaca_rows, base_config, run_example, train_with, write_dataset_dir

REWARDS = '''
import json, os

def vowels(prompts, responses):
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]

def knows_the_answer(prompts, responses, references):
    rows = json.load(open(os.path.join(os.path.dirname(__file__), "alpaca.json")))
    answers = {r["output"] for r in rows}
    return [float(ref in answers and "Question" in p) for p, ref in zip(prompts, references)]
'''


@pytest.fixture()
def prompts_dir(tmp_path):
    folder = write_dataset_dir(tmp_path / "prompts", alpaca_rows(32))
    (folder / "rewards.py").write_text(REWARDS)
    return folder


def _ppo(model_dir, data_dir, out, **kw):
    settings = dict(stage="ppo", reward_function=f"{data_dir}/rewards.py:vowels", max_new_tokens=8, ppo_epochs=2,
                    per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4)
    return base_config(model_dir, data_dir, out, **{**settings, **kw})


def _logged(state, key):
    return {e["step"]: e[key] for e in state["log_history"] if key in e}


def _segments_model(model_dir):
    from transformers import AutoModelForCausalLM

    from trainer.model import kernels

    kernels.register()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=kernels.SEGMENTS)


def test_the_sampler_repeats_each_buffer_on_the_process_that_sampled_it():
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from trainer.stages.rollout_sampler import RolloutSampler

    sampler = RolloutSampler(21, batch_size=2, accumulation=2, world=2, buffer_steps=1, repeats=3, seed=5,
                             epoch_of=lambda: 1)  # the epoch comes from the Trainer's step, not from set_epoch
    sampler.set_epoch(0)
    keys = list(sampler)
    assert len(keys) == len(sampler) == 3 * 8 * 3  # 3 buffers of 8 prompts (the last filled from the start), 3 passes
    assert {k[3] for k in keys} == set(range(21)) and {k[0] for k in keys} == {1}
    assert len({k for k in keys}) == 3 * 8  # a prompt drawn twice to fill the last buffer has two slots
    reshuffled = False
    for rank in range(2):  # what accelerate hands each of two processes
        batches = list(BatchSamplerShard(BatchSampler(sampler, 2, False), num_processes=2, process_index=rank))
        for buffer in range(3):
            mine = batches[buffer * 6:(buffer + 1) * 6]  # 2 micro-batches a pass, 3 passes
            assert all(tuple(k[:2]) == (1, buffer) for batch in mine for k in batch)
            passes = [[(k[2], k[3]) for batch in mine[p * 2:(p + 1) * 2] for k in batch] for p in range(3)]
            assert passes[0] == sampler.share(1, buffer, rank)
            assert sorted(passes[1]) == sorted(passes[2]) == sorted(passes[0])
            reshuffled |= passes[1] != passes[0]
    assert reshuffled


def test_a_dataset_smaller_than_a_buffer_trains_every_drawn_slot(tiny_model_dir, prompts_dir, tmp_path):
    """3 prompts, buffers of 8: each prompt is drawn more than once, and each drawing is its own sample."""
    from trainer.stages.rollout_sampler import RolloutSampler

    sampler = RolloutSampler(3, batch_size=4, accumulation=2, world=1, buffer_steps=1, repeats=2, seed=0)
    keys = list(sampler)
    from collections import Counter

    assert len(set(keys)) == 8 and sorted(Counter(k[3] for k in set(keys)).values()) == [2, 3, 3]
    _, state = train_with(_ppo(tiny_model_dir, prompts_dir, tmp_path / "out", max_samples=3, max_steps=2,
                               logging_steps=1))
    assert state["log_history"][0]["response_length"] > 0


def test_policy_outputs_equal_a_plain_forward_of_each_sequence(tiny_model_dir):
    from trainer.model import value_head
    from trainer.model.wrapper import ModelWrapper
    from trainer.stages.rollouts import Sample, collate

    model = _segments_model(tiny_model_dir)
    head = value_head.attach(model, [])
    samples = [Sample([5, 6, 7], [8, 9], []), Sample([10, 11], [12, 13, 14, 15], []), Sample([3], [4], [])]
    temperature = 0.7
    with torch.no_grad():
        out = ModelWrapper(model).policy_outputs(model, collate(samples, "cpu"), head, temperature, entropy=True)
        mask = out["mask"]
        expected = {"logps": [], "values": [], "entropy": []}
        for s in samples:
            alone = model(input_ids=torch.tensor([s.prompt + s.response]), output_hidden_states=True)
            logp = torch.log_softmax(alone.logits[0].float() / temperature, dim=-1)
            for i, token in enumerate(s.response):
                at = len(s.prompt) - 1 + i  # the position whose output predicts response token i
                expected["logps"].append(logp[at, token])
                expected["values"].append(head(alone.hidden_states[-1][0, at])[0])
                expected["entropy"].append(-(logp[at].exp() * logp[at]).sum())
    for name, values in expected.items():
        torch.testing.assert_close(out[name][mask], torch.stack(values), rtol=1e-5, atol=1e-5)


def test_batched_generation_equals_one_prompt_at_a_time_greedy(tiny_model_dir, tiny_tokenizer):
    from trainer.generation import GenerationSettings, generate

    model = _segments_model(tiny_model_dir)
    with torch.no_grad():  # sharper than a fresh init, so no argmax is a near tie
        model.lm_head.weight.mul_(20)
    prompts = [tiny_tokenizer.encode(t) for t in ("Hello there! How", "The capital of France is Paris. The capital",
                                                  "def add(a, b):")]
    assert len({len(p) for p in prompts}) == 3
    stop = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    settings = GenerationSettings(max_new_tokens=12, do_sample=False)
    batched = generate(model, prompts, [stop], tiny_tokenizer.pad_token_id, settings, batch_size=3)
    alone = [generate(model, [p], [stop], tiny_tokenizer.pad_token_id, settings)[0] for p in prompts]
    assert batched == alone and all(len(a) == 12 for a in alone)


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_step_one_is_on_policy(tiny_model_dir, prompts_dir, tmp_path, finetuning_type):
    """Before any update the policy is the reference and the sampler: KL, ratio and clipping are exactly idle."""
    _, state = train_with(_ppo(tiny_model_dir, prompts_dir, tmp_path / "out", finetuning_type=finetuning_type,
                               max_steps=2, logging_steps=1))
    first, second = state["log_history"][:2]
    assert first["kl"] == 0 and first["approx_kl"] == 0 and first["clipfrac/policy"] == 0
    assert first["clipfrac/value"] == 0 and first["kl_coef"] == 0.2
    assert first["response_length"] > 0 and 0 <= first["reward"] <= 1 and first["entropy"] > 0
    assert "reward" not in second and second["approx_kl"] > 0  # the buffer's second pass: the policy has moved


@pytest.mark.parametrize("estimator,extra", [("gae", {"ppo_score_norm": True, "learning_rate": 1e-2}),
                                             ("grpo", {"learning_rate": 3e-3})])
def test_the_reward_rises_with_the_kl_bounded(tiny_model_dir, prompts_dir, tmp_path, estimator, extra):
    """The share of vowels in 8 sampled tokens of a random tiny model (about 0.2 to start) rises clearly in 48 steps
    (24 buffers), while the KL to the reference stays within twice ppo_target."""
    out = tmp_path / "out"
    _, state = train_with(_ppo(tiny_model_dir, prompts_dir, out, advantage_estimator=estimator, finetuning_type="full",
                               max_steps=48, logging_steps=4, plot_loss=True, **extra))
    rewards, kls = list(_logged(state, "reward").values()), list(_logged(state, "kl").values())
    assert len(rewards) == 12
    assert statistics.mean(rewards[-3:]) > statistics.mean(rewards[:2]) + 0.1, rewards
    assert max(kls) < 12, kls
    assert (out / "value_head.safetensors").is_file() == (estimator == "gae")  # grpo has no critic
    assert (out / "training_reward.png").is_file() and (out / "training_kl.png").is_file()
    saved = json.loads((out / "ppo_state.json").read_text())
    assert saved["rollouts"] == 24
    if estimator == "gae":  # every score of every rollout normalised; the KL coefficient adapted after each
        assert saved["score_moments"]["count"] == 24 * 8 and saved["kl_coef"] != 0.2


def test_reward_functions_get_the_prompt_and_the_datasets_answer(tiny_model_dir, prompts_dir, tmp_path):
    _, state = train_with(_ppo(tiny_model_dir, prompts_dir, tmp_path / "out", max_steps=2, logging_steps=1,
                               cutoff_len=1024, reward_function=f"{prompts_dir}/rewards.py:knows_the_answer"))
    assert state["log_history"][0]["reward"] == 1.0


@pytest.fixture()
def rm_lora(tiny_model_dir, pairs_dir, tmp_path):
    out = tmp_path / "rm-lora"
    train_with(base_config(tiny_model_dir, pairs_dir, out, stage="rm", dataset="pairs", max_steps=4))
    return out


def test_lora_reward_scores_equal_the_rm_adapter_alone_and_leave_the_policy_as_it_was(tiny_model_dir, rm_lora):
    from peft import LoraConfig, PeftModel, get_peft_model

    from trainer.model.wrapper import ModelWrapper
    from trainer.stages.rewards import ModelReward, load_reward_adapter, load_value_head
    from trainer.stages.rollouts import Sample, collate

    policy = get_peft_model(_segments_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a policy that has moved away from the base
    load_reward_adapter(policy, str(rm_lora))
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}
    head = load_value_head(str(rm_lora), policy.config.hidden_size)
    samples = [Sample([5, 6, 7], [8, 9], []), Sample([10, 11], [12, 13, 14, 15], [])]
    batch = collate(samples, "cpu")
    scores = ModelReward(str(rm_lora), head).score_batch(policy, ModelWrapper(policy), batch)
    assert policy.active_adapter == "default"
    assert flags == {n: p.requires_grad for n, p in policy.named_parameters()}
    assert any(flags[n] for n in flags if "default" in n) and not any(flags[n] for n in flags if ".reward." in n)
    reference = PeftModel.from_pretrained(_segments_model(tiny_model_dir), str(rm_lora))
    with torch.no_grad():
        expected = [head(reference(input_ids=torch.tensor([s.prompt + s.response]), output_hidden_states=True)
                         .hidden_states[-1][0, -1])[0] for s in samples]
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_ppo_with_an_rm_lora_output_as_reward_model(tiny_model_dir, prompts_dir, rm_lora, tmp_path):
    out = tmp_path / "out"
    _, state = train_with(_ppo(tiny_model_dir, prompts_dir, out, reward_function=None, reward_model=str(rm_lora),
                               max_steps=2, logging_steps=1))
    assert "reward" in state["log_history"][0] and state["log_history"][0]["kl"] == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "value_head.safetensors").is_file()


def test_ppo_with_a_full_rm_output_as_reward_model(tiny_model_dir, prompts_dir, pairs_dir, tmp_path):
    rm = tmp_path / "rm-full"
    train_with(base_config(tiny_model_dir, pairs_dir, rm, stage="rm", dataset="pairs", finetuning_type="full",
                           max_steps=2))
    _, state = train_with(_ppo(tiny_model_dir, prompts_dir, tmp_path / "out", reward_function=None,
                               reward_model=str(rm), reward_model_type="full", max_steps=2, logging_steps=1))
    assert "reward" in state["log_history"][0] and state["log_history"][0]["kl"] == 0


@pytest.mark.parametrize("saved,killed_at", [(4, 5), (9, 11)])
def test_a_killed_run_resumes_from_its_last_checkpoint(tiny_model_dir, prompts_dir, tmp_path, saved, killed_at):
    """Killed (SIGKILL) after a checkpoint; resumed, it trains the remaining steps as the run that was never stopped
    did. At step 4 (between buffers: ppo_epochs 2, 8 steps an epoch) the critic, the KL coefficient and the
    buffer's own sampling seed come back; at step 9 (the second epoch, in the middle of a buffer) the sampled buffer
    itself does (each process saved its own), and the prompt order is the second epoch's."""
    from test_reliability import _drive

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _, reference = train_with(_ppo(tiny_model_dir, prompts_dir, straight, max_steps=12, logging_steps=1))
    cfg = _ppo(tiny_model_dir, prompts_dir, killed, max_steps=12, logging_steps=1, save_steps=saved)
    patch = f"""
        original = ZeroTrainer.training_step
        def step(self, *args, **kwargs):
            if self.state.global_step == {killed_at}:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *args, **kwargs)
        ZeroTrainer.training_step = step
    """
    import signal

    proc = _drive(tmp_path, cfg, patch)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == [f"checkpoint-{saved}"]
    assert (killed / f"checkpoint-{saved}" / "ppo_experience_0.pt").is_file()
    proc = _drive(tmp_path, cfg, "", "resume_from_checkpoint=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((killed / "trainer_state.json").read_text())
    for key in ("loss", "reward", "kl_coef", "value_loss", "approx_kl"):
        want, got = _logged(reference, key), _logged(resumed, key)
        for step in (s for s in want if s > saved):
            assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-6), (key, step)


def test_ppo_lora_example_runs(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_example("ppo_lora.yaml", tiny_model_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and "reward" in state["log_history"][0]


@pytest.mark.parametrize("overrides,message", [
    ({"reward_function": None}, "stage ppo needs reward_model"),
    ({"reward_function": "nowhere.py:f"}, "reward_function: nowhere.py does not exist"),
    ({"reward_function": "json:no_such_name"}, "reward_function: 'json' has no callable 'no_such_name'"),
    ({"reward_function": None, "reward_model": "{tmp}", "finetuning_type": "full"},
     "reward_model_type: lora loads the reward adapter onto the policy's own base"),
    ({"advantage_estimator": "grpo", "num_generations": 1}, "num_generations must be at least 2"),
    ({"advantage_estimator": "grpo", "do_sample": False}, "grpo needs do_sample: true"),
    ({"val_size": 0.1}, "stage ppo has no eval loss"),
    ({"packing": True}, "packing: stage ppo"),
    ({"ppo_epochs": 0}, "ppo_epochs: 0 must be at least 1"),
    ({"train_on_prompt": True}, "train_on_prompt: stage ppo reads each example's prompt"),
    ({"temperature": 0}, "temperature: 0.0 with do_sample: true"),
    ({"max_new_tokens": 0}, "max_new_tokens: 0: ppo needs room for an answer"),
])
def test_refusals_name_the_key(tiny_model_dir, prompts_dir, tmp_path, overrides, message):
    from trainer.run import build_config
    from trainer.errors import ConfigError

    overrides = {k: (v.format(tmp=tmp_path) if isinstance(v, str) else v) for k, v in overrides.items()}
    cfg = {k: v for k, v in {**_ppo(tiny_model_dir, prompts_dir, tmp_path / "o"), **overrides}.items()
           if v is not None}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(cfg)


def test_sampling_is_from_the_policy_the_losses_read(tiny_model_dir, prompts_dir, tmp_path, caplog):
    """LLaMA-Factory's generation defaults (top_p 0.7, top_k 50) would sample from a truncated distribution while
    the ratios and KL read the full softmax: ppo samples untruncated unless the YAML asks, and then warns."""
    from trainer.run import build_config

    g = build_config(_ppo(tiny_model_dir, prompts_dir, tmp_path / "o")).generation
    assert (g.top_p, g.top_k, g.repetition_penalty, g.temperature) == (1.0, 0, 1.0, 0.95)
    with caplog.at_level("WARNING", logger="trainer"):
        g = build_config(_ppo(tiny_model_dir, prompts_dir, tmp_path / "o", top_p=0.9)).generation
    assert g.top_p == 0.9 and g.top_k == 0 and "ppo samples with top_p: 0.9" in caplog.text


def test_a_run_continuing_an_sft_adapter_starts_at_its_reference(tiny_model_dir, prompts_dir, tmp_path):
    """With adapter_name_or_path the policy trains that adapter further; the reference is the model the run starts
    from (base + that adapter, a frozen copy), not the bare base, so the first KL is exactly 0."""
    sft = tmp_path / "sft"
    train_with(base_config(tiny_model_dir, prompts_dir, sft, max_steps=3, learning_rate=1e-2))
    _, state = train_with(_ppo(tiny_model_dir, prompts_dir, tmp_path / "out", adapter_name_or_path=str(sft),
                               max_steps=2, logging_steps=1))
    assert state["log_history"][0]["kl"] == 0 and state["log_history"][1]["approx_kl"] > 0
