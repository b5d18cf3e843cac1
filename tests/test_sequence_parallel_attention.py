"""The sharded-attention path of sequence parallelism at N = 1, through the same code as N > 1 (one GPU cannot run two
processes of a group; sequence_parallel_size: 1 does not take the path at all, so the test calls its pieces at their
call sites): the row cut by engine/sequence_parallel.shard with its whole-row segment layout, DeepSpeed's
UlyssesSPAttentionHF over a one-process group around the core attention zerotune hands it (zerotune_segments, or
FlashAttention-2 varlen), and the wrapper's loss head reading the pre-shifted labels. Every example's token losses
equal a forward of that example alone. On CUDA in bf16 (marker gpu, run by benchmarks/gpu_check.sh); on CPU the same
body runs in fp32 with zerotune_segments' pure-torch core, in seconds."""

import importlib.util

import pytest
import torch
import torch.distributed as dist

from trainer.data.collators import Collator
from trainer.model import kernels

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CASES = [pytest.param("cpu", kernels.SEGMENTS, id="cpu-segments"),
         pytest.param("cuda", kernels.SEGMENTS, id="cuda-segments", marks=GPU),
         pytest.param("cuda", "flash_attention_2", id="cuda-flash2",
                      marks=[*GPU, pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None,
                                                      reason="flash-attn not installed")])]


@pytest.fixture()
def one_process_group(monkeypatch):
    """A sequence-parallel group of one process, through deepspeed.comm as DeepSpeed's attention expects (gloo for
    host tensors, nccl for CUDA ones)."""
    import socket

    import deepspeed

    made = not dist.is_initialized()
    if made:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                               WORLD_SIZE="1").items():
            monkeypatch.setenv(key, value)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    yield dist.new_group([0])
    if made:
        dist.destroy_process_group()


def _ulysses(model, core: str, process_group) -> str:
    """Wrap the core attention in DeepSpeed's Ulysses attention, registered under a name of its own (as
    register_with_transformers does, without replacing the core's global entry), and point the model at it."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cfg = model.config.get_text_config()
    ulysses = UlyssesSPAttentionHF(attn=ALL_ATTENTION_FUNCTIONS[core], batch_size=1,
                                   attn_head_count=cfg.num_attention_heads,
                                   attn_head_size=getattr(cfg, "head_dim", None)
                                   or cfg.hidden_size // cfg.num_attention_heads,
                                   kv_head_count=cfg.num_key_value_heads, num_hidden_layers=cfg.num_hidden_layers,
                                   process_group=process_group, seq_length_is_variable=True)
    ulysses.core_attn_implementation = core

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        return ulysses(module, query, key, value, None, *args, **kwargs)  # DeepSpeed drops the mask too

    name = f"zt_test_ulysses_{core}"
    AttentionInterface.register(name, attention)
    return name


def _model(model_dir, core: str, device: str, dtype):
    from transformers import AutoModelForCausalLM

    kernels.register()
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=core, dtype=dtype)
    with torch.no_grad():  # weights big enough that attending across examples would show
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    return model.to(device).train()  # the Ulysses path runs in training forwards (sp_disable_in_eval)


def _several(rows: list[dict]) -> dict:
    """One row of three examples of different lengths (the start of three examples each), so that two of them would
    see earlier ones if the segment layout were lost."""
    cut = [40, 50, 30]
    return {"input_ids": [t for r, n in zip(rows, cut) for t in r["input_ids"][:n]],
            "labels": [t for r, n in zip(rows, cut) for t in r["labels"][:n]], "lengths": cut}


@pytest.mark.parametrize("device, core", CASES)
def test_a_sharded_row_through_ulysses_gives_each_example_its_loss_alone(device, core, tiny_model_dir, packed_rows,
                                                                         one_process_group):
    from trainer.engine.sequence_parallel import SHIFTED, shard
    from trainer.model.losses import shift_targets
    from trainer.model.wrapper import ModelWrapper

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = _model(tiny_model_dir, core, device, dtype)
    wrapper = ModelWrapper(model)
    row = _several(packed_rows)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in Collator(0)([row]).items()}
    sharded = shard(dict(batch), 0, 1)
    assert SHIFTED in sharded and "labels" not in sharded  # the call site's batch: labels shifted before the cut
    model.set_attn_implementation(_ulysses(model, core, one_process_group))
    with torch.no_grad():
        together, mask = wrapper.token_nll(model, sharded)
        model.set_attn_implementation(core)
        start, checked = 0, 0
        for n in row["lengths"]:
            one = Collator(0)([{"input_ids": row["input_ids"][start:start + n], "labels": row["labels"][start:start + n],
                                "lengths": [n]}])
            one = {k: v.to(device) if torch.is_tensor(v) else v for k, v in one.items()}
            alone, alone_mask = wrapper.token_nll(model, one)
            assert torch.equal(mask[0, start:start + n], alone_mask[0])
            tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(together[0, start:start + n][alone_mask[0]].float(),
                                       alone[0][alone_mask[0]].float(), **tol)
            start, checked = start + n, checked + int(alone_mask.sum())
    assert checked > 0 and start == batch["input_ids"].shape[1]
    assert torch.equal(shift_targets(batch["labels"]), sharded[SHIFTED])  # N = 1: the shard is the whole row


def test_a_core_attention_without_the_segment_layout_fails_the_same_check(tiny_model_dir, packed_rows,
                                                                           one_process_group):
    """The mutation check: SDPA as the core gets no mask after DeepSpeed's attention (it drops it), so the examples
    of the row attend to each other and the comparison above fails."""
    with pytest.raises(AssertionError, match="Mismatched elements"):
        test_a_sharded_row_through_ulysses_gives_each_example_its_loss_alone("cpu", "sdpa", tiny_model_dir,
                                                                             packed_rows, one_process_group)
