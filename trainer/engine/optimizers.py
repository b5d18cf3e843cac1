"""The one place the optimizer is built: a registry of the methods the optimizer keys ask for (engine/
optimizer_options.py), each through its own package, and the log of what every group holds.

Without a method, transformers' Trainer builds `optim` (AdamW, bitsandbytes' 8-bit AdamW, ...) and the groups are
logged the same way. Each builder returns the optimizer and one (label, class) per param group; ZeroTrainer logs
them, so a run says which parameters each optimizer group trains and at what learning rate.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from trainer.engine.optimizer_options import OptimizerArguments, chosen_method
from trainer.errors import ConfigError
from trainer.model.adapters import OUTPUT_LAYERS, all_linear_names
from trainer.model.params import parameter_count

logger = logging.getLogger(__name__)


@dataclass
class Setting:
    """What a builder works from: the model, TrainingArguments, the optimizer keys and the Trainer's decay names."""
    model: nn.Module
    args: object
    options: OptimizerArguments
    decay: set[str]

    @property
    def named(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def split_decay(self, named) -> list[dict]:
        """[decayed, not decayed] groups (norms and biases are not decayed), empty ones left out."""
        decayed = [p for n, p in named if n in self.decay]
        kept = [p for n, p in named if n not in self.decay]
        return [g for g in ({"params": decayed, "weight_decay": self.args.weight_decay},
                            {"params": kept, "weight_decay": 0.0}) if g["params"]]


Built = tuple[torch.optim.Optimizer, list[tuple[str, str]]]  # the optimizer, (label, class) per param group
BUILDERS: dict[str, Callable[[Setting], Built]] = {}


def builder(method: str):
    def register(fn):
        BUILDERS[method] = fn
        return fn
    return register


def build_optimizer(model: nn.Module, args, options: OptimizerArguments, decay: set[str]) -> Built | None:
    """The optimizer the keys ask for, or None when none does (then transformers builds `optim`)."""
    method = chosen_method(options)
    if method is None:
        return None
    return BUILDERS[method](Setting(model, args, options, set(decay)))


def optim_class(args, model=None) -> tuple[type, dict]:
    """transformers' class and constructor arguments for `optim` (lr, betas, eps and its own)."""
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return cls, dict(kwargs)


def keep_embeddings_32bit(model: nn.Module, cls: type) -> None:
    """bitsandbytes' 8-bit states are unstable for embeddings: keep theirs in 32 bits, as transformers' Trainer does
    for `optim` (its create_optimizer registers the same override)."""
    if "bitsandbytes" not in cls.__module__:
        return
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})


def is_embedding_or_head(name: str, param: nn.Parameter, model: nn.Module) -> bool:
    """Input embeddings and output heads (LM head, value head, their LoRA or saved copies): AdamW's in Muon's
    split, by the rule DeepSpeed's and LLaMA-Factory's Muon use (a name holding "embed" or "lm_head"), widened to
    the model's own embedding modules and zerotune's output-layer names."""
    own = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            own.add(id(module.weight))
    return id(param) in own or "embed" in name.lower() or any(part in OUTPUT_LAYERS for part in name.split("."))


# ---- Muon ---------------------------------------------------------------------------------------------------------
class MuonWithRest(torch.optim.Optimizer):
    """torch's Muon for the 2-D hidden matrices and one other optimizer for every other parameter, stepped as one:
    param_groups lists both halves' own group dicts, so the learning-rate scheduler reaches both."""

    def __init__(self, muon: torch.optim.Muon, rest: torch.optim.Optimizer | None):
        self.muon, self.rest = muon, rest
        super().__init__(self._halves_groups(), {})

    def _halves_groups(self) -> list[dict]:
        return [*self.muon.param_groups, *(self.rest.param_groups if self.rest is not None else [])]

    @property
    def state(self):  # each half keeps its own state; this merged view is for readers only
        merged = dict(self.muon.state)
        if self.rest is not None:
            merged.update(self.rest.state)
        return merged

    @state.setter
    def state(self, value):  # torch's Optimizer.__init__ assigns an empty state, which the halves already have
        pass

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        if self.rest is not None:
            self.rest.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        if self.rest is not None:
            self.rest.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "rest": self.rest.state_dict() if self.rest is not None else None}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        if self.rest is not None:
            self.rest.load_state_dict(state_dict["rest"])
        self.param_groups = self._halves_groups()  # loading replaces each half's group dicts


@builder("muon")
def _muon(s: Setting) -> Built:
    # Muon is steepest descent under the spectral norm of a hidden layer's weight matrix; embeddings (a lookup
    # table), heads and 1-D parameters are not such operators and train with `optim`. LoRA's A and B inside the
    # decoder are the hidden matrices a LoRA run trains, so they take Muon, as under DeepSpeed's and
    # LLaMA-Factory's rule; LoRA adapters of embeddings stay with `optim`.
    hidden = [(n, p) for n, p in s.named if p.ndim == 2 and not is_embedding_or_head(n, p, s.model)]
    if not hidden:
        raise ConfigError("use_muon: this run trains no 2-D hidden matrix (only embeddings, heads or 1-D "
                          "parameters), so Muon would optimize nothing; remove use_muon.")
    chosen = {id(p) for _, p in hidden}
    others = [(n, p) for n, p in s.named if id(p) not in chosen]
    lr = s.args.learning_rate
    # match_rms_adamw: each matrix's orthogonal update is scaled to AdamW's typical RMS (0.2 x sqrt(max dims)), so
    # one learning_rate serves both halves, as LLaMA-Factory's Muon (and Moonshot's recipe) do.
    muon = torch.optim.Muon([p for _, p in hidden], lr=lr, weight_decay=s.args.weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    rest, labels = None, [("Muon: 2-D hidden matrices", qualified(torch.optim.Muon))]
    if others:
        cls, kwargs = optim_class(s.args, s.model)
        groups = s.split_decay(others)
        rest = cls(groups, **kwargs)
        keep_embeddings_32bit(s.model, cls)
        labels += [(f"the rest, {'weight decay' if g['weight_decay'] else 'no weight decay'}", qualified(cls, rest))
                   for g in groups]
    return MuonWithRest(muon, rest), labels


# ---- Adam-mini ----------------------------------------------------------------------------------------------------
@builder("adam_mini")
def _adam_mini(s: Setting) -> Built:
    from adam_mini import Adam_mini

    config = s.model.config
    heads = getattr(config, "num_attention_heads", None)
    if not (getattr(config, "hidden_size", None) and heads):
        raise ConfigError("use_adam_mini: the model's config has no hidden_size / num_attention_heads, which "
                          "Adam-mini needs to split attention weights by head.")
    optimizer = Adam_mini(named_parameters=s.named, lr=s.args.learning_rate,
                          betas=(s.args.adam_beta1, s.args.adam_beta2), eps=s.args.adam_epsilon,
                          weight_decay=s.args.weight_decay, dim=config.hidden_size, n_heads=heads,
                          n_kv_heads=getattr(config, "num_key_value_heads", None), verbose=False)
    return optimizer, [(adam_mini_block(optimizer, g["name"]), qualified(Adam_mini)) for g in optimizer.param_groups]


def adam_mini_block(optimizer, name: str) -> str:
    """How Adam-mini shares the second moment of a parameter, by the name sets it matches in its step (in that
    order): per entry (biases), per attention head (query, key), per row (embeddings, output, value, attention
    output, MLP), or one for the whole tensor (norms and anything else)."""
    def has(names):
        return any(word in name for word in names)

    if has(optimizer.adam_block_names):
        return "Adam-mini: biases, one second moment per entry (Adam)"
    if has(optimizer.wqk_names):
        return "Adam-mini: query and key, one second moment per head"
    if has(optimizer.embd_names | optimizer.output_names | optimizer.wv_names | optimizer.mlp_names
           | optimizer.attn_proj_names):
        return "Adam-mini: embeddings, output, value, attention output and MLP, one second moment per row"
    return "Adam-mini: norms and other tensors, one second moment per tensor"


# ---- GaLore and APOLLO: low-rank projected states for the Linear weights -------------------------------------------
def projected_split(s: Setting, targets: list[str]) -> tuple[list, list]:
    """(the 2-D weights of the targeted Linear layers, every other trained parameter). Targets match a layer's
    name as a substring, as in LLaMA-Factory; `all` is every Linear of the decoder (not the output heads)."""
    if targets in (["all"], ["all-linear"]):
        targets = all_linear_names(s.model)
    chosen = {}
    for module_name, module in s.model.named_modules():
        if isinstance(module, nn.Linear) and any(t in module_name for t in targets):
            for p in module.parameters():
                if p.requires_grad and p.ndim == 2:
                    chosen[id(p)] = p
    projected = [(n, p) for n, p in s.named if id(p) in chosen]
    return projected, [(n, p) for n, p in s.named if id(p) not in chosen]


def _targets(value: str) -> list[str]:
    return [t.strip() for t in str(value).split(",") if t.strip()]


def _kwargs_for(cls: type, kwargs: dict) -> dict:
    """The constructor arguments `cls` takes (transformers adds `fused`/`foreach` for torch's own AdamW)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


def _projected_optimizer(s: Setting, method: str, cls: type, group_keys: dict, extra: dict) -> Built:
    projected, others = projected_split(s, _targets(getattr(s.options, f"{method}_target")))
    if not projected:
        raise ConfigError(f"{method}_target: {getattr(s.options, f'{method}_target')!r} matches no trained Linear "
                          "layer of this model.")
    _, kwargs = optim_class(s.args, s.model)
    kwargs = _kwargs_for(cls, {**kwargs, **extra})
    groups = s.split_decay(others) + [{"params": [p for _, p in projected], "weight_decay": s.args.weight_decay,
                                       **group_keys}]
    labels = [(f"not projected, {'weight decay' if g['weight_decay'] else 'no weight decay'}", qualified(cls))
              for g in groups[:-1]] + [(f"{method}: low-rank projected Linear weights", qualified(cls))]
    keep_embeddings_32bit(s.model, cls)
    return cls(groups, **kwargs), labels


def _allow_projectors_in_checkpoints(*classes: type) -> None:
    """GaLore's and APOLLO's optimizer state holds their projector objects; transformers reloads optimizer.pt with
    torch.load(weights_only=True), which refuses unknown classes: allow these (torch's own allow-list), so a run
    resumes from its checkpoints."""
    torch.serialization.add_safe_globals(list(classes))


@builder("galore")
def _galore(s: Setting) -> Built:
    import galore_torch

    optim = str(getattr(s.args.optim, "value", s.args.optim))
    cls = (galore_torch.GaLoreAdafactor if optim == "adafactor" else
           galore_torch.GaLoreAdamW8bit if "8bit" in optim else galore_torch.GaLoreAdamW)
    o = s.options
    keys = {"rank": o.galore_rank, "update_proj_gap": o.galore_update_interval, "scale": o.galore_scale,
            "proj_type": o.galore_proj_type}
    _allow_projectors_in_checkpoints(galore_torch.galore_projector.GaLoreProjector)
    return _projected_optimizer(s, "galore", cls, keys, {"no_deprecation_warning": True})


@builder("apollo")
def _apollo(s: Setting) -> Built:
    from apollo_torch import APOLLOAdamW, random_projector, svd_projector

    _allow_projectors_in_checkpoints(random_projector.GradientProjector, svd_projector.GaLoreProjector)
    o = s.options
    keys = {"rank": o.apollo_rank, "proj": o.apollo_proj, "proj_type": o.apollo_proj_type,
            "update_proj_gap": o.apollo_update_interval, "scale": o.apollo_scale, "scale_type": o.apollo_scale_type}
    return _projected_optimizer(s, "apollo", APOLLOAdamW, keys, {"scale_front": o.apollo_scale_front})


# ---- BAdam: one block of layers trains at a time --------------------------------------------------------------------
@builder("badam")
def _badam(s: Setting) -> Built:
    from badam import BlockOptimizer

    if s.args.world_size > 1:
        raise ConfigError(f"use_badam is supported in one process only (this run has {s.args.world_size}): it "
                          "switches which parameters require gradients as it runs, which DDP's buffers, built once, "
                          "cannot follow (LLaMA-Factory refuses it under DDP too).")
    cls, kwargs = optim_class(s.args, s.model)
    # BAdam rebuilds its active block's groups from the base optimizer's defaults, which overwrite the groups' own
    # weight decay: without weight_decay among them, torch's AdamW default (0.01) would decay every run, as it
    # does in LLaMA-Factory whatever weight_decay says. So the base optimizer's default is the run's weight_decay
    # (norms and biases included: BAdam's merge leaves no undecayed group).
    kwargs["weight_decay"] = s.args.weight_decay
    groups = s.split_decay(s.named)
    named = list(s.model.named_parameters())
    o = s.options
    interval = o.badam_switch_interval if o.badam_switch_interval > 0 else 2**62  # -1: never switch
    optimizer = BlockOptimizer(base_optimizer=cls(groups, **kwargs), named_parameters_list=named,
                               block_prefix_list=None, switch_block_every=interval, start_block=o.badam_start_block,
                               switch_mode=o.badam_switch_mode, verbose=o.badam_verbose)
    blocks = optimizer.block_prefix_list
    if s.args.resume_from_checkpoint:
        logger.warning("use_badam: BAdam's checkpoint holds no block position, so the resumed run starts again from "
                       "block %s (badam_start_block / badam_switch_mode) with fresh moments, not where the saved run "
                       "stopped.", optimizer.active_param_prefixs)
    logger.info("BAdam: %d blocks (%s ... %s), one trained at a time, switching every %s steps (%s); the first "
                "is %s. Parameters outside every block (embeddings, head, final norm) stay frozen, as in BAdam.",
                len(blocks), blocks[0], blocks[-1], o.badam_switch_interval if interval < 2**62 else "never",
                o.badam_switch_mode, optimizer.active_param_prefixs)
    labels = [(f"BAdam base optimizer over every block, {'weight decay' if g['weight_decay'] else 'no weight decay'}",
               qualified(cls)) for g in groups]
    return optimizer, labels


# ---- LoRA+ ---------------------------------------------------------------------------------------------------------
@builder("loraplus")
def _loraplus(s: Setting) -> Built:
    from peft.optimizers import create_loraplus_optimizer

    cls, kwargs = optim_class(s.args, s.model)
    kwargs.pop("lr", None)
    o = s.options
    optimizer = create_loraplus_optimizer(s.model, cls, lr=s.args.learning_rate, loraplus_lr_ratio=o.loraplus_lr_ratio,
                                          loraplus_lr_embedding=o.loraplus_lr_embedding,
                                          loraplus_weight_decay=s.args.weight_decay, **kwargs)
    # PEFT's groups, in its order: A (and every other 2-D weight), embedding adapters, B, B without decay.
    names = ["LoRA+ A and other matrices (learning_rate)", "LoRA+ embedding adapters (loraplus_lr_embedding)",
             f"LoRA+ B and 1-D (learning_rate x {o.loraplus_lr_ratio:g})",
             f"LoRA+ B and 1-D, no weight decay (learning_rate x {o.loraplus_lr_ratio:g})"]
    return optimizer, [(label, qualified(cls, optimizer)) for label in names]


# ---- what each group holds, for the log ---------------------------------------------------------------------------
def name_patterns(names: list[str], limit: int = 6) -> str:
    """Parameter names with layer numbers folded (model.layers.*.mlp.up_proj.weight), the first `limit` of them."""
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(re.sub(r"\.\d+\.", ".*.", name))
    shown = list(seen)
    more = f" and {len(shown) - limit} more" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def describe_groups(optimizer: torch.optim.Optimizer, labels: list[tuple[str, str]], model: nn.Module) -> list[str]:
    """One line per (label, class, lr, weight decay): tensors, parameters and which ones."""
    names = {id(p): n for n, p in model.named_parameters()}
    rows: dict[tuple, list] = {}
    for group, (label, cls) in zip(optimizer.param_groups, labels):
        key = (label, cls, float(group.get("lr", 0.0)), float(group.get("weight_decay", 0.0)))
        rows.setdefault(key, []).extend(group["params"])
    lines = []
    for (label, cls, lr, decay), params in rows.items():
        if not params:
            continue
        count = parameter_count(params)  # ZeRO-3's partitioned parameters count whole
        listed = [names.get(id(p), "<unnamed>") for p in params]
        lines.append(f"{label}: {cls}, lr {lr:g}, weight_decay {decay:g}, {len(params)} tensors, {count:,} "
                     f"parameters: {name_patterns(listed)}")
    return lines


def qualified(cls: type, optimizer=None) -> str:
    """A class as its package and name (torch.AdamW, bitsandbytes.AdamW 8-bit), so the log tells them apart."""
    bits = getattr(getattr(optimizer, "args", None), "optim_bits", None)
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}" + (f" {bits}-bit" if bits else "")


def default_labels(optimizer: torch.optim.Optimizer) -> list[tuple[str, str]]:
    """transformers' own groups: decayed and not (norms, biases)."""
    cls = qualified(type(optimizer), optimizer)
    return [("weight decay" if g.get("weight_decay") else "no weight decay", cls) for g in optimizer.param_groups]
