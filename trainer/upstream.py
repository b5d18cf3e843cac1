"""The one list of upstream internals zerotune overrides, swaps or relies on, and the releases it is tested with.

transformers, accelerate, PEFT and DeepSpeed (and a few torch and datasets internals) change private methods,
attributes and module functions in any release without notice. Each entry below names the upstream object, the
zerotune file that overrides or relies on it, why, and a check that returns what changed (None: as tested) from its
signature, its existence, or a small behavioural probe where a signature says too little.

At the start of a run (check_trainer_api, called by ZeroTrainer) a tested package outside its tested range, or a
changed internal, is refused with a ConfigError naming the pip command for the tested releases; setting
ZEROTUNE_ALLOW_UNTESTED=1 turns the refusal into a warning. Start runs the fast checks of the packages the process
has imported; tests/test_upstream.py runs every check (the slow ones build a tiny model) and fails when trainer/
touches a private upstream name this list does not hold.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import re
import sys
from typing import Callable

from trainer.errors import ConfigError

logger = logging.getLogger(__name__)

ALLOW_ENV = "ZEROTUNE_ALLOW_UNTESTED"

# The releases zerotune is tested with; setup.py caps at the same ranges (tests/test_versions.py checks both agree).
# 0.x packages break their internals between minor releases, so each is capped after the minor series tested. When
# this was written: transformers 5.24.0, peft 0.21.2, accelerate 1.16.0, deepspeed 0.19.8; liger-kernel (CUDA only)
# is not installed on the CPU test machine, its cap is the 0.8 series its floor names (0.8.5, the newest release).
TESTED = {
    "transformers": ">=5.0,<5.25",
    "peft": ">=0.17,<0.22",
    "accelerate": ">=1.4,<2",
    "deepspeed": ">=0.16,<0.20",
    "liger-kernel": ">=0.8.5,<0.9",
    "bitsandbytes": ">=0.50,<0.51",  # QLoRA (model/quantization.py, model/params.py): 0.50.2 when this was written
}
TESTED_TRANSFORMERS = "5.24"

@dataclasses.dataclass(frozen=True)
class Internal:
    name: str  # the upstream object, as a dotted path
    used_in: str  # the zerotune file(s) that override or rely on it
    why: str
    check: Callable[[], str | None]  # what changed (None: as tested)
    touches: tuple[str, ...] = ()  # other private upstream names zerotune's code spells for it
    slow: bool = False  # builds a model: run by the tests, not at every start

    @property
    def module(self) -> str:
        return self.name.split(".")[0]

    def changed(self) -> str | None:
        try:
            found = self.check()
        except Exception as err:  # a probe that no longer runs is a change too
            found = f"its check failed ({type(err).__name__}: {err})"
        if found is None:
            return None
        return found if found.startswith(self.name) else f"{self.name}: {found}"


# ---- checks ----------------------------------------------------------------------------------------------------

def resolve(path: str):
    """The object at a dotted path: the longest importable module of it, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module of {path} imports")


def _parameters(path: str) -> tuple[str, ...] | str:
    try:
        obj = resolve(path)
    except (ImportError, AttributeError):
        return f"{path} no longer exists"
    return tuple(p for p in inspect.signature(obj).parameters if p not in ("args", "kwargs"))


def signature(path: str, *params: str, prefix: bool = False, includes: tuple[str, ...] = ()):
    """The parameters zerotune passes or receives, exactly (or as the first ones, with prefix), plus `includes`."""
    def check():
        found = _parameters(path)
        if isinstance(found, str):
            return found
        head = found[:len(params)] if prefix else found
        missing = [p for p in includes if p not in found]
        if head != params or missing:
            return f"{path}{found} was {path}{params}{' ...' if prefix else ''}" + (
                f" with {', '.join(includes)}" if includes else "")
        return None
    return check


def reads(path: str, *needles: str):
    """Upstream code at `path` still spells each needle: the attribute zerotune sets or overrides is still what
    upstream reads (a signature cannot say whether a method is still called)."""
    def check():
        try:
            source = inspect.getsource(resolve(path))
        except (ImportError, AttributeError):
            return f"{path} no longer exists"
        missing = [n for n in needles if n not in source]
        return f"{path} no longer reads {', '.join(missing)}" if missing else None
    return check


def _all(*checks):
    def check():
        return next((c for c in (check() for check in checks) if c), None)
    return check


def _differs(what: str, ours, theirs, tol: float = 1e-6) -> str | None:
    import torch

    if ours.shape != theirs.shape or not torch.allclose(ours.double(), theirs.double(), rtol=tol, atol=tol):
        return what
    return None


def _rng():
    import torch

    return torch.Generator().manual_seed(0)


# ---- behavioural probes: torch ----------------------------------------------------------------------------------

def _softmax_backward_data() -> str | None:
    import torch

    x = torch.randn(3, 5, dtype=torch.float64, generator=_rng(), requires_grad=True)
    g = torch.randn(3, 5, dtype=torch.float64, generator=_rng())
    p = torch.softmax(x, -1)
    (expected,) = torch.autograd.grad(p, x, g)
    return _differs("no longer the softmax gradient from (grad, probs, dim, dtype)",
                    torch._softmax_backward_data(g, p.detach(), -1, p.dtype), expected)


def _softmax_out() -> str | None:
    import torch

    x = torch.randn(3, 5, dtype=torch.float64, generator=_rng())
    probs = x.clone()
    torch.ops.aten._softmax.out(probs, 1, False, out=probs)  # in place, as losses.py calls it
    return _differs("no longer writes softmax(x, dim) in place", probs, torch.softmax(x, 1))


def _assert_async() -> str | None:
    import torch

    torch._assert_async(torch.tensor(True), "fine")
    try:
        torch._assert_async(torch.tensor(False), "zerotune probe")
    except RuntimeError:
        return None
    return "no longer raises on a false condition (checked at once on CPU)"


def _silu_backward() -> str | None:
    import torch

    gate = torch.randn(4, dtype=torch.float64, generator=_rng(), requires_grad=True)
    g = torch.randn(4, dtype=torch.float64, generator=_rng())
    (expected,) = torch.autograd.grad(torch.nn.functional.silu(gate), gate, g)
    return _differs("no longer silu's gradient from (grad, input)", torch.ops.aten.silu_backward(g, gate.detach()),
                    expected)


def _mkldnn_linear() -> str | None:
    import torch

    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():  # then decoding keeps F.linear (model/cpu_linear.py)
        return None
    x = torch.randn(3, 2, 8, generator=_rng())
    w, b = torch.randn(5, 8, generator=_rng()), torch.randn(5, generator=_rng())
    return _differs("no longer x @ W.T + b from (X, W, B, 'none', [], '')", op(x, w, b, "none", [], ""),
                    torch.nn.functional.linear(x, w, b), tol=1e-5)


# ---- behavioural probes: transformers' modules ------------------------------------------------------------------

def _llama_config(**kwargs):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, **kwargs)


def _rotary() -> str | None:
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = (torch.randn(2, h, 5, 8, dtype=torch.float64, generator=_rng()) for h in (4, 2))
    cos, sin = (torch.randn(2, 5, 8, dtype=torch.float64, generator=_rng()) for _ in range(2))

    def rotated(x):  # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), the tables unsqueezed at dim 1
        x1, x2 = x.chunk(2, -1)
        return x * cos.unsqueeze(1) + torch.cat([-x2, x1], -1) * sin.unsqueeze(1)

    theirs = apply_rotary_pos_emb(q, k, cos, sin)
    return _differs("no longer rotates q and k by (cos, sin) as lean_ops' rotary does",
                    torch.cat([t.flatten() for t in theirs]), torch.cat([rotated(q).flatten(), rotated(k).flatten()]))


def _rmsnorm() -> str | None:
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(generator=_rng())
    if getattr(norm, "variance_epsilon", None) != 1e-5:
        return "no longer keeps its eps as variance_epsilon"
    x = torch.randn(2, 3, 8, generator=_rng())
    expected = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    with torch.no_grad():
        return _differs("no longer weight * x / rms(x)", norm(x), expected, tol=1e-5)


def _swiglu() -> str | None:
    import torch
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = LlamaMLP(_llama_config())
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return "no longer has gate_proj, up_proj, down_proj and act_fn"
    x = torch.randn(2, 3, 16, generator=_rng())
    with torch.no_grad():
        expected = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        return _differs("no longer down(silu(gate(x)) * up(x))", mlp(x), expected, tol=1e-5)


def _attn_implementation() -> str | None:
    config = _llama_config(attn_implementation="sdpa")
    found = getattr(config, "_attn_implementation", None)
    return None if found == "sdpa" else f"holds {found!r}, not the attn_implementation it was given ('sdpa')"


def _tiny_llama(attention: str = "sdpa"):
    import torch
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(_llama_config(attn_implementation=attention)).eval()


PACKED = ((0, 1, 2, 3, 0, 1, 2),)  # position_ids of two examples laid end to end in one row


def _packed_rows_apart() -> str | None:
    """Without a mask or a cache, transformers reads example boundaries from restarting position_ids (sdpa and
    eager attention, which zerotune keeps for models its segment attention does not cover)."""
    import torch

    model = _tiny_llama("sdpa")
    ids = torch.arange(3, 10).unsqueeze(0)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=torch.tensor(PACKED), use_cache=False).logits[0, 4:]
        alone = model(input_ids=ids[:, 4:], use_cache=False).logits[0]
    return _differs("packed examples (restarting position_ids, no mask, no cache) now attend across examples",
                    packed, alone, tol=1e-5)


def _attention_call() -> str | None:
    """A registered attention function and mask function get what kernels.segment_attention / segment_mask read."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    seen = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        seen.update(query=query.shape, key=key.shape, kwargs=set(kwargs))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def mask(*args, **kwargs):
        seen["mask"] = set(kwargs)
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register("zerotune_upstream_probe", attention)
    AttentionMaskInterface.register("zerotune_upstream_probe", mask)
    model = _tiny_llama("zerotune_upstream_probe")
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    with torch.no_grad():
        model(input_ids=torch.arange(3, 10).unsqueeze(0), position_ids=torch.tensor(PACKED), use_cache=False,
              cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4)
    if seen.get("query") != (1, 2, 7, 8) or seen.get("key") != (1, 1, 7, 8):
        return f"query/key reach the attention function as {seen.get('query')}/{seen.get('key')}, not [B, H, T, D]"
    missing = {"position_ids", "cu_seq_lens_q", "scaling"} - seen["kwargs"]
    if missing:
        return f"the attention function no longer receives {', '.join(sorted(missing))}"
    if "attention_mask" not in seen.get("mask", set()):
        return "the mask function no longer receives attention_mask as a keyword"
    return None


def _logits_are_the_head_output() -> str | None:
    """model.wrapper's loss and value modes return per-token losses/values from lm_head in place of logits."""
    import torch

    model = _tiny_llama()
    model.lm_head.forward = lambda hidden: hidden[..., :3] * 0 + 7
    with torch.no_grad():
        logits = model(input_ids=torch.arange(3, 8).unsqueeze(0), use_cache=False).logits
    if logits.shape != (1, 5, 3) or not bool((logits == 7).all()):
        return "no longer returns lm_head's output as its logits unchanged"
    return None


def _keys_ignored_on_save() -> str | None:
    import tempfile

    import torch
    from safetensors import safe_open

    model = _tiny_llama()
    model.v_head = torch.nn.Linear(16, 1)
    model._keys_to_ignore_on_save = {"v_head.weight", "v_head.bias"}
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
            kept = [k for k in f.keys() if k.startswith("v_head")]
    return f"save_pretrained writes {kept} despite _keys_to_ignore_on_save" if kept else None


# ---- behavioural probes: PEFT ------------------------------------------------------------------------------------

def _lora_linear():
    """A PEFT LoRA Linear with one plain adapter (no dropout, variant or bias) whose B is not zero, made through PEFT's
    public API (its layers' constructors change between releases)."""
    import torch
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 3)), LoraConfig(r=2, lora_alpha=4,
                                                                                       target_modules=["0"]))
        layer = model.base_model.model[0]
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    return layer


def _lora_forward() -> str | None:
    """lean_ops' fused forward replaces PEFT's for a plain adapter: PEFT's must be base(x) + s * B(A(x)), with the
    attributes _plain_adapter reads."""
    import torch

    from peft.tuners.lora.layer import Linear

    layer = _lora_linear()
    if type(layer) is not Linear:  # fuse_lora_forward finds the layers by exactly this type
        return f"LoRA on an nn.Linear is now a {type(layer).__qualname__}, not a peft.tuners.lora.layer.Linear"
    try:
        plain = (not layer.disable_adapters and not layer.merged and list(layer.active_adapters) == ["default"]
                 and "default" not in layer.lora_variant and layer.lora_B["default"].bias is None
                 and isinstance(layer.lora_dropout["default"], torch.nn.Identity) and layer.scaling["default"] == 2)
    except (AttributeError, KeyError, TypeError) as err:
        return f"a LoRA layer no longer has what lean_ops reads ({err})"
    if not plain:
        return "a plain adapter no longer looks plain (disable_adapters, merged, active_adapters, lora_variant, " \
               "lora_dropout, scaling)"
    x = torch.randn(2, 4, generator=_rng())
    with torch.no_grad():
        expected = layer.base_layer(x) + 2 * layer.lora_B["default"](layer.lora_A["default"](x))
        return _differs("no longer computes base(x) + scaling * B(A(x))", layer(x), expected, tol=1e-6)


def _lora_input_cast() -> str | None:
    """lean_ops gives each LoRA layer its own _cast_input_dtype: PEFT's forward must call it on the instance."""
    import torch

    layer = _lora_linear()
    calls = []
    original = layer._cast_input_dtype
    layer._cast_input_dtype = lambda x, dtype: calls.append(dtype) or original(x, dtype)
    with torch.no_grad():
        layer(torch.randn(2, 4, generator=_rng()))
    return None if calls else "PEFT's forward no longer casts the adapter input through self._cast_input_dtype"


# ---- behavioural probes: bitsandbytes ----------------------------------------------------------------------------

def _bnb_quant_state() -> str | None:
    """model/params.py counts a 4-bit weight by its quant_state's shape and its bytes from the packed storage and the
    state's tensors; model/quantization.py finds 4-bit layers as bitsandbytes.nn.Linear4bit."""
    import bitsandbytes as bnb
    import torch

    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True, quant_storage=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128, generator=_rng()), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, quant_storage=torch.bfloat16)
    weight = layer.to("cpu").weight
    state = getattr(weight, "quant_state", None)
    if state is None or tuple(getattr(state, "shape", ())) != (64, 128):
        return "a 4-bit weight's quant_state no longer keeps the weight's shape"
    if weight.dtype != torch.bfloat16 or weight.numel() * weight.element_size() != 64 * 128 // 2:
        return "4-bit weights are no longer stored packed, two to a byte, in the quant_storage dtype"
    nested = getattr(state, "state2", None)
    if not (state.nested and state.absmax.dtype == torch.uint8 and nested is not None
            and nested.absmax.dtype == torch.float32 and state.absmax.numel() == 64 * 128 // 64):
        return "double quantization no longer keeps one uint8 absmax a block of 64 and fp32 absmax in state2"
    return None


def _fingerprint() -> str | None:
    from datasets import Dataset

    same = [Dataset.from_dict({"a": [1, 2]})._fingerprint for _ in range(2)]
    other = Dataset.from_dict({"a": [1, 3]})._fingerprint
    if not (isinstance(same[0], str) and same[0] == same[1] != other):
        return "no longer a string that is the same for the same data and differs for other data"
    return None


def _scheduler_name() -> str | None:
    from transformers.trainer import SCHEDULER_NAME

    return None if SCHEDULER_NAME == "scheduler.pt" else f"is {SCHEDULER_NAME!r}, not 'scheduler.pt'"


def _no_split_modules() -> str | None:
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    found = getattr(LlamaForCausalLM, "_no_split_modules", None)
    return None if found == ["LlamaDecoderLayer"] else f"LlamaForCausalLM's is {found!r}, not ['LlamaDecoderLayer']"


def _flash_kwargs() -> str | None:
    from transformers.modeling_flash_attention_utils import FlashAttentionKwargs

    keys = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    missing = keys - set(FlashAttentionKwargs.__annotations__)
    return f"no longer names {', '.join(sorted(missing))}" if missing else None


def _integrations() -> str | None:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return None if "wandb" in INTEGRATION_TO_CALLBACK else "no longer maps report_to names such as wandb"


def _launcher_modules() -> str | None:
    missing = [m for m in ("deepspeed.launcher.launch", "deepspeed.launcher.runner") if importlib.util.find_spec(m)
               is None]
    return f"{', '.join(missing)} no longer exist (signals.py finds the launcher by these names)" if missing else None


# ---- the list ----------------------------------------------------------------------------------------------------

def _called(name: str):
    """The Trainer still refers to self.<name> (an override of a method nothing calls any more silently does
    nothing)."""
    def check():
        source = inspect.getsource(resolve("transformers.trainer"))
        return None if re.search(rf"self\.{name}\b", source) else f"the Trainer no longer calls self.{name}"
    return check


# The transformers.Trainer methods ZeroTrainer overrides: the parameters it relies on, and why it overrides them.
_OVERRIDES = {
    "_get_num_items_in_batch": (("self", "batch_samples", "device"),
                                "the loss divisor is the stage's item count over the whole accumulated (and global) "
                                "batch"),
    "compute_loss": (("self", "model", "inputs", "return_outputs", "num_items_in_batch"),
                     "the loss comes from the stage plugin, divided by that global count"),
    "prediction_step": (("self", "model", "inputs", "prediction_loss_only", "ignore_keys"),
                        "eval returns per-item sums and counts, so eval figures are exact token-weighted means"),
    "training_step": (("self", "model", "inputs", "num_items_in_batch"), "starts the throughput window at the first "
                                                                          "step"),
    "evaluate": (("self", "eval_dataset", "ignore_keys", "metric_key_prefix"),
                 "eval time is left out of the logged tokens/s and MFU"),
    "evaluation_loop": (("self", "dataloader", "description", "prediction_loss_only", "ignore_keys",
                         "metric_key_prefix"),
                        "replaces the mean of per-batch losses by the exact one (reads metric_key_prefix as args[4])"),
    "log": (("self", "logs", "start_time"), "adds tokens/s, MFU, padding and the stage's statistics to each log"),
    "_get_output_dir": (("self", "trial"), "checkpoints are written into a staging folder"),
    "_save_checkpoint": (("self", "model", "trial"), "checkpoints are published atomically once complete"),
    "_push_from_checkpoint": (("self", "checkpoint_folder"),
                              "pushes the published checkpoint, not the staged one, without tokens in "
                              "training_args.bin"),
    "_save": (("self", "output_dir", "state_dict"),
              "gathers FSDP2 shards, writes the stage's extras (value head), redacts tokens"),
    "_move_model_to_device": (("self", "model", "device"), "an FSDP2-sharded model is already placed"),
    "_wrap_model": (("self", "model", "training", "dataloader"), "an FSDP2-sharded model must not be wrapped in DDP"),
    "_save_optimizer_and_scheduler": (("self", "output_dir"), "FSDP2 optimizer state as sharded files"),
    "_load_from_checkpoint": (("self", "resume_from_checkpoint", "model"),
                              "FSDP2 shards, and the stage's extras, on resume"),
    "_load_best_model": (("self",), "FSDP2 shards and the stage's extras for load_best_model_at_end"),
    "_load_optimizer_and_scheduler": (("self", "checkpoint"),
                                      "FSDP2 optimizer shards; refuses to restart Adam from an FSDP checkpoint without "
                                      "fsdp"),
    "_get_train_sampler": (("self", "train_dataset"), "the stage's sampler (ppo's rollout batches)"),
    "floating_point_ops": (("self", "inputs"), "total_flos without walking every parameter on each step"),
    "create_optimizer": (("self", "model"), "builds what the optimizer keys ask for (engine/optimizers.py) and logs "
                                            "every group; under DeepSpeed it is the client optimizer ZeRO wraps"),
}
OVERRIDDEN = {name: params for name, (params, _) in _OVERRIDES.items()}
TRAINER_OVERRIDES = [
    Internal(f"transformers.Trainer.{name}", "trainer/engine/trainer.py", why,
             _all(signature(f"transformers.Trainer.{name}", *params), _called(name)))
    for name, (params, why) in _OVERRIDES.items()
]

INTERNALS: list[Internal] = TRAINER_OVERRIDES + [
    # ---- transformers.Trainer, used but not overridden
    Internal("transformers.Trainer._prepare_inputs", "trainer/engine/trainer.py, trainer/stages/reference_logps.py",
             "moves a batch to the device as the Trainer's own steps do", signature(
                 "transformers.Trainer._prepare_inputs", "self", "inputs")),
    Internal("transformers.Trainer.loss_is_scaled_for_ga", "trainer/engine/trainer.py",
             "set True (with model_accepts_loss_kwargs): the loss is already divided by the global item count, the "
             "Trainer must not divide it again by the accumulation",
             reads("transformers.Trainer.training_step", "self.loss_is_scaled_for_ga",
                   "self.model_accepts_loss_kwargs"),
             touches=("model_accepts_loss_kwargs",)),
    Internal("transformers.Trainer.neftune_noise_alpha", "trainer/engine/trainer.py",
             "set to None after init so that train() does not add transformers' row-width NEFTune hook beside "
             "zerotune's per-example one", reads("transformers.Trainer.train", "if self.neftune_noise_alpha is not None")),
    Internal("transformers.Trainer.optimizer", "trainer/engine/trainer.py",
             "create_optimizer stores the built optimizer there, where the Trainer's own create_optimizer keeps it",
             reads("transformers.Trainer.create_optimizer", "self.optimizer =", "return self.optimizer")),
    Internal("transformers.Trainer.compute_metrics", "trainer/engine/trainer.py",
             "evaluation_loop sets it for each eval to sum the stage's statistics",
             reads("transformers.Trainer.evaluation_loop", "self.compute_metrics(")),
    Internal("transformers.trainer.SCHEDULER_NAME", "trainer/engine/trainer.py",
             "FSDP2 checkpoints save the scheduler under the name a plain resume reads", _scheduler_name),
    Internal("transformers.trainer_callback.ProgressCallback.training_bar", "trainer/stages/ppo.py",
             "ppo shows rollouts and reward on the Trainer's progress bar",
             reads("transformers.trainer_callback.ProgressCallback.on_train_begin", "self.training_bar = ")),
    Internal("transformers.integrations.integration_utils.INTEGRATION_TO_CALLBACK", "trainer/engine/training_args.py",
             "report_to names are checked (did-you-mean, missing package) before a run", _all(
                 _integrations, signature(
                     "transformers.integrations.integration_utils.get_available_reporting_integrations"))),
    Internal("transformers.integrations.deepspeed.is_deepspeed_zero3_enabled", "trainer/generation.py",
             "ZeRO-3 generation must keep every process in step (synced_gpus)",
             signature("transformers.integrations.deepspeed.is_deepspeed_zero3_enabled")),
    # ---- transformers models
    Internal("transformers.models.llama.modeling_llama.apply_rotary_pos_emb", "trainer/model/lean_ops.py",
             "swapped (in each modeling module whose function computes the same) for a rotary with less kept for "
             "backward", _all(signature("transformers.models.llama.modeling_llama.apply_rotary_pos_emb", "q", "k",
                                        "cos", "sin", "unsqueeze_dim"), _rotary)),
    Internal("transformers.models.llama.modeling_llama.LlamaRMSNorm.forward", "trainer/model/lean_ops.py",
             "replaced per module by an RMSNorm that keeps only its input for backward", _rmsnorm,
             touches=("variance_epsilon",)),
    Internal("transformers.models.llama.modeling_llama.LlamaMLP.forward", "trainer/model/lean_ops.py",
             "replaced per module by a SwiGLU that keeps only gate and up for backward", _swiglu),
    Internal("transformers.models.llama.modeling_llama.LlamaForCausalLM.forward", "trainer/model/wrapper.py",
             "lm_head's forward is swapped for per-token losses/values, which the model must return as its logits",
             _logits_are_the_head_output, slow=True),
    Internal("transformers.PreTrainedModel._no_split_modules", "trainer/engine/fsdp.py",
             "the decoder layer classes FSDP2 shards one by one", _no_split_modules),
    Internal("transformers.PreTrainedModel._keys_to_ignore_on_save", "trainer/model/value_head.py",
             "the value head hangs off the model but is saved in its own file", _keys_ignored_on_save, slow=True),
    Internal("transformers.PreTrainedConfig._attn_implementation", "trainer/stages/pairs.py, trainer/model/reference.py",
             "a reference or reward model is loaded with the policy's attention", _attn_implementation),
    # ---- transformers attention
    Internal("transformers.AttentionInterface.register", "trainer/model/kernels.py",
             "zerotune_segments is registered as an attention and a mask function; the call passes [B, H, T, D] "
             "tensors, position_ids and cu_seq_lens_q", _attention_call, slow=True),
    Internal("transformers.integrations.sdpa_attention.sdpa_attention_forward", "trainer/model/kernels.py",
             "padded batches and KV-cache generation take transformers' SDPA path", signature(
                 "transformers.integrations.sdpa_attention.sdpa_attention_forward", "module", "query", "key", "value",
                 "attention_mask", "dropout", "scaling", prefix=True)),
    Internal("transformers.masking_utils.sdpa_mask", "trainer/model/kernels.py",
             "zerotune_segments' mask function is SDPA's where the batch has padding",
             signature("transformers.masking_utils.sdpa_mask", "batch_size", "q_length", "kv_length", prefix=True,
                       includes=("attention_mask",))),
    Internal("transformers.modeling_flash_attention_utils.FlashAttentionKwargs", "trainer/data/collators.py",
             "the collator's cu_seq_lens / max_length keys are the ones models pass down to attention", _flash_kwargs),
    Internal("transformers.masking_utils.find_packed_sequence_indices", "trainer/model/loading.py, "
             "trainer/model/wrapper.py", "with sdpa or eager attention, packed examples are kept apart by restarting "
             "position_ids when there is no mask and no cache", _packed_rows_apart, slow=True),
    # ---- accelerate
    Internal("accelerate.Accelerator._models", "trainer/engine/trainer.py",
             "an FSDP2-sharded model is registered with accelerate once (autocast, no DDP)",
             reads("accelerate.Accelerator.prepare_model", "self._models.append(model)")),
    Internal("accelerate.Accelerator.prepare_model", "trainer/engine/trainer.py",
             "a model marked _is_accelerate_prepared comes back unwrapped when the Trainer prepares it again",
             _all(signature("accelerate.Accelerator.prepare_model", "self", "model", "device_placement",
                            "evaluation_mode"),
                  reads("accelerate.Accelerator.prepare_model", 'getattr(model, "_is_accelerate_prepared", False)')),
             touches=("_is_accelerate_prepared",)),
    # ---- PEFT
    Internal("peft.tuners.lora.layer.LoraLayer._cast_input_dtype", "trainer/model/lean_ops.py",
             "replaced per layer to skip the fp32 input copy under autocast", _all(
                 signature("peft.tuners.lora.layer.LoraLayer._cast_input_dtype", "self", "x", "dtype"),
                 _lora_input_cast)),
    Internal("peft.tuners.lora.layer.Linear.forward", "trainer/model/lean_ops.py",
             "replaced per layer by base + s * B(A(x)) as one in-place addmm for a plain adapter", _all(
                 signature("peft.tuners.lora.layer.Linear.forward", "self", "x"), _lora_forward)),
    # ---- DeepSpeed
    Internal("deepspeed.runtime.zero.partition_parameters.Init", "trainer/model/adapters.py, "
             "trainer/model/value_head.py, trainer/model/lean_ops.py, trainer/model/params.py, trainer/plan.py",
             "ZeRO-3 parameters are recognised by ds_id and counted by ds_numel (they hold 0 elements locally)",
             reads("deepspeed.runtime.zero.partition_parameters", "param.ds_numel = ", "param.ds_id = ")),
    Internal("deepspeed.utils.groups._get_sequence_parallel_group", "trainer/engine/sequence_parallel.py",
             "a process's sequence-parallel group, rank and size (set up by UlyssesSPAttentionHF's mpu)",
             _all(*(signature(f"deepspeed.utils.groups._get_sequence_parallel_{n}") for n in
                    ("group", "rank", "world_size"))),
             touches=("_get_sequence_parallel_rank", "_get_sequence_parallel_world_size")),
    Internal("deepspeed.runtime.comm.coalesced_collectives.reduce_scatter_coalesced", "trainer/engine/sequence_parallel.py",
             "ZeRO-3's reduce-scatter averages gradients over all processes, ignoring sequence parallelism (ZeRO-1/2 "
             "divide by processes / N): gradient_divisor scales the loss for each", _all(
                 reads("deepspeed.runtime.comm.coalesced_collectives",  # the function is wrapped (nvtx): its module
                       "def reduce_scatter_coalesced(", "tensor_partition_flat_buffer.div_(world_sz)"),
                 reads("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
                       "/ float(self.sequence_parallel_size)"))),
    Internal("accelerate.Accelerator.deepspeed_ulysses_dl_adapter", "trainer/engine/sequence_parallel.py",
             "replaced per accelerator by zerotune's GroupBatches (whole batches, cut by the engine after counting); "
             "the Trainer calls it once the model is prepared", _all(
                 signature("accelerate.Accelerator.deepspeed_ulysses_dl_adapter", "self", "dl", "model"),
                 reads("transformers.Trainer._prepare_for_training", "self.accelerator.deepspeed_ulysses_dl_adapter("))),
    Internal("deepspeed.runtime.sequence_parallel.ulysses_sp.TiledMLP", "trainer/model/tiled_mlp.py",
             "tiled_mlp calls fn(module, shard) per shard and pads the row to exactly `shards` chunks, because the "
             "backward marks the parameters ready for ZeRO (ds_grad_is_ready) only at shard number `shards`", _all(
                 signature("deepspeed.runtime.sequence_parallel.ulysses_sp.TiledMLP.forward", "ctx", "fn", "self",
                           "x", "shards", "compute_params"),
                 reads("deepspeed.runtime.sequence_parallel.ulysses_sp.TiledMLP.backward",
                       "if i + 1 < shards:", "param.ds_grad_is_ready = False", "output = fn(self, x_shard)"))),
    Internal("deepspeed.launcher.launch", "trainer/engine/signals.py",
             "workers watch the DeepSpeed runner and launcher processes, found by these module names",
             _launcher_modules),
    Internal("deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs", "trainer/plan.py",
             "zerotune check's ZeRO-3 memory plan", signature(
                 "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs", "total_params",
                 "largest_layer_params", "num_gpus_per_node", "num_nodes", "cpu_offload", "cpu_offload_params",
                 prefix=True)),
    Internal("deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs", "trainer/plan.py",
             "zerotune check's ZeRO-2 memory plan", signature(
                 "deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs", "total_params",
                 "num_gpus_per_node", "num_nodes", "cpu_offload", prefix=True)),
    # ---- bitsandbytes (QLoRA)
    Internal("bitsandbytes.functional.QuantState", "trainer/model/params.py, trainer/model/quantization.py",
             "a 4-bit weight is counted by its quant_state's shape and its bytes from the packed storage plus the "
             "state's absmax, code and nested state", _bnb_quant_state),
    Internal("bitsandbytes.nn.Linear4bit.support_avx512bf16_for_cpu", "trainer/model/quantization.py",
             "turned off in a trained model: at an eval-mode forward without gradient Linear4bit repacks its CPU "
             "weights for a kernel with no backward, after which no gradient flows through the layer",
             reads("bitsandbytes.nn.modules.Linear4bit.forward", "self.support_avx512bf16_for_cpu",
                   "not self.training")),
    # ---- torch and datasets internals
    Internal("torch._softmax_backward_data", "trainer/model/cpu_attention.py",
             "the bf16 CPU attention's backward through its kept probabilities", _softmax_backward_data),
    Internal("torch.ops.aten._softmax.out", "trainer/model/losses.py",
             "the chunked loss takes the softmax of a logits chunk in place", _softmax_out, touches=("_softmax",)),
    Internal("torch._assert_async", "trainer/model/losses.py",
             "the loss head checks the collator's target count and sft's equal token weights on the device, without "
             "a host read", _assert_async),
    Internal("torch.ops.aten.silu_backward", "trainer/model/lean_ops.py", "the lean SwiGLU's backward in one pass",
             _silu_backward),
    Internal("torch.ops.mkldnn._linear_pointwise", "trainer/model/cpu_linear.py",
             "fp32 decode linears through oneDNN where the process measures it faster than MKL", _mkldnn_linear),
    Internal("datasets.Dataset._fingerprint", "trainer/stages/reference_logps.py",
             "the cache key of precomputed reference log-probs", _fingerprint),
    # ---- optional CUDA kernels (checked where installed)
    Internal("liger_kernel.transformers.functional.liger_fused_linear_cross_entropy", "trainer/model/wrapper.py",
             "per-token losses from Liger's fused kernel (input, weight, target, bias, reduction='none')", signature(
                 "liger_kernel.transformers.functional.liger_fused_linear_cross_entropy", "input", "weight", "target",
                 "bias", prefix=True, includes=("reduction",))),
    Internal("liger_kernel.transformers.apply_liger_kernel_to_llama", "trainer/model/kernels.py",
             "Liger's RoPE, RMSNorm and SwiGLU patched in, its losses off (apply_liger_kernel_to_<model_type>)",
             signature("liger_kernel.transformers.apply_liger_kernel_to_llama", prefix=True, includes=(
                 "rope", "rms_norm", "swiglu", "cross_entropy", "fused_linear_cross_entropy"))),
    Internal("flash_attn.flash_attn_varlen_func", "trainer/model/kernels.py",
             "shared-prompt pairs run as one varlen call with bottom-right causal alignment (flash-attn >= 2.1)",
             signature("flash_attn.flash_attn_varlen_func", "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k",
                       "max_seqlen_q", "max_seqlen_k", prefix=True, includes=("dropout_p", "softmax_scale", "causal"))),
]


def _installed(module: str) -> bool:
    return module in sys.modules or importlib.util.find_spec(module) is not None


def upstream_changes(slow: bool = True, imported_only: bool = False) -> list[str]:
    """What differs upstream from what zerotune was written against (empty: all as tested). Entries of packages
    that are not installed are skipped; `imported_only` skips those of packages this process has not imported
    (a run cannot be using them); `slow=False` skips the probes that build a model."""
    changes = []
    for entry in INTERNALS:
        present = entry.module in sys.modules if imported_only else _installed(entry.module)
        if not present or (entry.slow and not slow):
            continue
        change = entry.changed()
        if change:
            changes.append(change)
    return changes


def trainer_api_changes() -> list[str]:
    """What differs between this transformers' Trainer and the methods ZeroTrainer overrides (empty: all as tested)."""
    return [c for c in (e.changed() for e in TRAINER_OVERRIDES) if c]


def version_problems() -> list[str]:
    """Each tested package installed outside its tested range, with the version found."""
    from packaging.specifiers import SpecifierSet

    problems = []
    for dist, tested in TESTED.items():
        try:
            found = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        if not SpecifierSet(tested).contains(found, prereleases=True):
            problems.append(f"{dist} {found} is outside the tested range {tested}")
    return problems


def check_trainer_api() -> None:
    """Refuse to start on untested upstream releases or changed internals (ZEROTUNE_ALLOW_UNTESTED=1: warn)."""
    problems = version_problems() + upstream_changes(slow=False, imported_only=True)
    if not problems:
        return
    optional = {"liger-kernel": "liger_kernel", "bitsandbytes": "bitsandbytes"}  # named only where installed
    pip = " ".join(f"'{dist}{tested}'" for dist, tested in TESTED.items() if dist not in optional
                   or _installed(optional[dist]))
    message = (f"zerotune is tested with other releases of the libraries whose internals it relies on "
               f"(trainer/upstream.py): {'; '.join(problems)}. Install the tested ones with: pip install {pip}")
    if os.environ.get(ALLOW_ENV) == "1":
        logger.warning("%s. Continuing because %s=1: training may misbehave.", message, ALLOW_ENV)
        return
    raise ConfigError(f"{message}; or set {ALLOW_ENV}=1 to run anyway, at your own risk.")
