"""trainer/upstream.py: every upstream internal zerotune relies on is listed, as tested, and a change is caught.

The checks pass on the installed libraries; a changed signature, a removed attribute or a changed behaviour is
reported; start refuses an untested transformers or a changed internal unless ZEROTUNE_ALLOW_UNTESTED=1; and a
survey of trainer/ fails when the code touches a private upstream name the list does not hold.
"""

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import trainer
from trainer import upstream
from trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("entry", upstream.INTERNALS, ids=lambda e: e.name)
def test_every_internal_is_as_tested(entry):
    if not upstream._installed(entry.module):
        pytest.skip(f"{entry.module} is not installed here")
    assert entry.changed() is None
    assert entry.used_in.startswith("trainer/") and entry.why


def test_each_upstream_object_is_listed_once():
    names = [e.name for e in upstream.INTERNALS]
    assert len(names) == len(set(names))


# ---- a change upstream is caught ---------------------------------------------------------------------------------

def _change_of(name: str) -> str | None:
    return next(e for e in upstream.INTERNALS if e.name == name).changed()


def test_a_changed_or_removed_trainer_method_is_named(monkeypatch):
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "_save_checkpoint", lambda self, model: None)
    monkeypatch.delattr(Trainer, "_load_best_model")
    changes = upstream.trainer_api_changes()
    assert "transformers.Trainer._save_checkpoint('self', 'model') was transformers.Trainer._save_checkpoint(" \
           "'self', 'model', 'trial')" in changes
    assert "transformers.Trainer._load_best_model no longer exists" in changes
    assert len(changes) == 2


def test_an_override_the_trainer_no_longer_calls_is_named(monkeypatch):
    """Same signature, but the Trainer calls something else: the override would silently do nothing."""
    real = inspect.getsource
    monkeypatch.setattr(inspect, "getsource",
                        lambda obj: real(obj).replace("self._get_num_items_in_batch", "self._count_items"))
    assert upstream.trainer_api_changes() == [
        "transformers.Trainer._get_num_items_in_batch: the Trainer no longer calls self._get_num_items_in_batch"]


def test_a_removed_attribute_is_named(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "_no_split_modules", None)
    assert "is None, not ['LlamaDecoderLayer']" in _change_of("transformers.PreTrainedModel._no_split_modules")
    monkeypatch.delattr(torch, "_softmax_backward_data")
    assert "its check failed (AttributeError" in _change_of("torch._softmax_backward_data")


def test_a_rotary_that_computes_something_else_is_named(monkeypatch):
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb

    def rotated_the_other_way(q, k, cos, sin, unsqueeze_dim=1):  # same signature, the conjugate rotation
        return original(q, k, cos, -sin, unsqueeze_dim)

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", rotated_the_other_way)
    assert "no longer rotates q and k" in _change_of("transformers.models.llama.modeling_llama.apply_rotary_pos_emb")


def test_a_lora_forward_that_bypasses_what_lean_ops_replaces_is_named(monkeypatch):
    from peft.tuners.lora.layer import Linear

    monkeypatch.setattr(Linear, "forward", lambda self, x, *args, **kwargs: self.base_layer(x))
    assert "no longer computes base(x) + scaling * B(A(x))" in _change_of("peft.tuners.lora.layer.Linear.forward")
    assert "no longer casts the adapter input" in _change_of("peft.tuners.lora.layer.LoraLayer._cast_input_dtype")


def test_accelerate_no_longer_honouring_the_prepared_mark_is_named(monkeypatch):
    from accelerate import Accelerator

    def prepare_model(self, model, device_placement=None, evaluation_mode=False):
        self._models.append(model)
        return model

    monkeypatch.setattr(Accelerator, "prepare_model", prepare_model)
    assert "no longer reads getattr(model, \"_is_accelerate_prepared\", False)" in _change_of(
        "accelerate.Accelerator.prepare_model")
    assert _change_of("accelerate.Accelerator._models") is None


def test_packed_rows_that_attend_across_examples_are_named(monkeypatch):
    from transformers import masking_utils

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    assert "now attend across examples" in _change_of("transformers.masking_utils.find_packed_sequence_indices")


# ---- start refuses what is untested ------------------------------------------------------------------------------

def _fake_version(monkeypatch, dist: str, fake: str):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: fake if name == dist else real(name))


@pytest.mark.parametrize("fake", ["5.25.0", "6.0.0", "4.57.1"])
def test_a_transformers_outside_the_tested_range_is_refused(fake, monkeypatch):
    from trainer.engine.trainer import ZeroTrainer

    monkeypatch.delenv(upstream.ALLOW_ENV, raising=False)
    _fake_version(monkeypatch, "transformers", fake)
    with pytest.raises(ConfigError) as err:
        ZeroTrainer(stage=None, wrapper=None)  # refused before anything is built
    message = str(err.value)
    tested = upstream.TESTED["transformers"]
    assert f"transformers {fake} is outside the tested range {tested}" in message
    assert f"pip install 'transformers{tested}'" in message and "ZEROTUNE_ALLOW_UNTESTED=1" in message


def test_the_tested_range_itself_is_accepted(monkeypatch):
    monkeypatch.delenv(upstream.ALLOW_ENV, raising=False)
    for fake in ("5.0.0", upstream.TESTED_TRANSFORMERS + ".0", "5.24.3rc1"):
        _fake_version(monkeypatch, "transformers", fake)
        upstream.check_trainer_api()


def test_a_changed_internal_is_refused(monkeypatch):
    from transformers import Trainer

    monkeypatch.delenv(upstream.ALLOW_ENV, raising=False)
    monkeypatch.delattr(Trainer, "_load_best_model")
    with pytest.raises(ConfigError, match="transformers.Trainer._load_best_model no longer exists"):
        upstream.check_trainer_api()


def test_the_environment_variable_turns_the_refusal_into_a_warning(monkeypatch, caplog):
    from transformers import Trainer

    _fake_version(monkeypatch, "peft", "0.30.0")
    monkeypatch.delattr(Trainer, "_load_best_model")
    monkeypatch.setenv(upstream.ALLOW_ENV, "1")
    with caplog.at_level("WARNING", logger="trainer.upstream"):
        upstream.check_trainer_api()
    assert "peft 0.30.0 is outside the tested range" in caplog.text
    assert "_load_best_model no longer exists" in caplog.text and "Continuing because ZEROTUNE_ALLOW_UNTESTED=1" \
        in caplog.text
    monkeypatch.setenv(upstream.ALLOW_ENV, "0")  # only 1 allows
    with pytest.raises(ConfigError):
        upstream.check_trainer_api()


# ---- nothing private upstream is touched without being listed ------------------------------------------------------

UPSTREAM_PACKAGES = ("transformers", "accelerate", "peft", "deepspeed", "datasets", "torch", "liger_kernel",
                     "flash_attn", "bitsandbytes")
ACCESSORS = ("getattr", "hasattr", "setattr", "delattr")
STANDARD_LIBRARY = ("os", "sys")  # os._exit, sys._getframe: documented, not an upstream package's internals


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _listed() -> set[str]:
    return {n for e in upstream.INTERNALS for n in (e.name.rsplit(".", 1)[1], *e.touches)}


def _sources() -> dict[str, ast.Module]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text()) for p in sorted((ROOT / "trainer").rglob("*.py"))
            if p.name != "upstream.py"}


def _own_names(trees) -> set[str]:
    """Names zerotune defines: functions, classes, variables, parameters, attributes it sets on self. (Attributes it
    sets on other objects are someone else's: those are what the survey is after.)"""
    own = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.arg):
                own.add(node.arg)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id == "self"):
                own.add(node.attr)
    return own


def _private_uses(tree) -> set[str]:
    """Private names read or set as attributes (obj._x, getattr(obj, "_x")) or imported from an upstream package."""
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner not in STANDARD_LIBRARY and not (owner == "self" and isinstance(node.ctx, ast.Store)):
                used.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ACCESSORS
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value)):
            used.add(node.args[1].value)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UPSTREAM_PACKAGES:
            used |= {a.name for a in node.names if _private(a.name)}
            used |= {part for part in node.module.split(".") if _private(part)}
    return used


def test_every_private_upstream_name_trainer_touches_is_listed():
    sources = _sources()
    own = _own_names(sources.values())
    unlisted = {f"{path}: {name}" for path, tree in sources.items() for name in _private_uses(tree) - own - _listed()}
    assert not unlisted, ("trainer/ touches private upstream names that trainer/upstream.py does not list (add an "
                          f"entry with a check): {sorted(unlisted)}")


def test_the_survey_sees_what_it_looks_for():
    """The survey itself: an unlisted private access, getattr string, private import and override are all found."""
    tree = ast.parse("import x\nfrom transformers.trainer import _secret\n"
                     "def f(model):\n    model.config._hidden = 1\n    return getattr(model, '_other', None)\n")
    assert _private_uses(tree) - _own_names([tree]) == {"_secret", "_hidden", "_other"}


def _upstream_classes(cls) -> list[type]:
    return [c for c in cls.__mro__[1:] if c.__module__.split(".")[0] in UPSTREAM_PACKAGES]


def _zerotune_subclasses() -> list[type]:
    found = []
    for info in pkgutil.walk_packages(trainer.__path__, "trainer."):
        module = importlib.import_module(info.name)
        found += [c for c in vars(module).values()
                  if isinstance(c, type) and c.__module__ == info.name and _upstream_classes(c)]
    return found


def _class_body(cls) -> tuple[set[str], set[str]]:
    """(names the class body defines, attributes its methods set on self), from its source: not what a metaclass
    adds (torch's Function gives every subclass a _backward_cls)."""
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(cls))).body[0]
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    on_self = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
               and isinstance(n.value, ast.Name) and n.value.id == "self"}
    return defined, on_self


def _sets_on_self(cls, name: str) -> bool:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # a class written in C
        return False
    return re.search(rf"self\.{name}\s*[:=]", source) is not None


def test_every_override_of_an_upstream_class_is_listed():
    """A subclass of an upstream class (ZeroTrainer, the callbacks, autograd functions, modules) that overrides one
    of its private methods, or any Trainer method, or sets an attribute that a transformers, accelerate, PEFT or
    DeepSpeed class has, relies on what upstream does with it: each must be listed. Public hooks meant to be
    overridden (forward, on_step_end) and attributes of torch's extension points (Module, Sampler) are not."""
    from transformers import Trainer

    listed, unlisted, classes = _listed(), set(), _zerotune_subclasses()
    assert any(c.__name__ == "ZeroTrainer" for c in classes) and any(c.__name__ == "GracefulStop" for c in classes)
    for cls in classes:
        bases = _upstream_classes(cls)
        defined, on_self = _class_body(cls)
        for name in defined:
            overrides = any(hasattr(b, name) for b in bases) and not name.startswith("__")
            if overrides and (_private(name) or Trainer in bases) and name not in listed:
                unlisted.add(f"{cls.__name__}.{name} (overrides)")
        owners = [b for b in bases if b.__module__.split(".")[0] != "torch"]
        for name in on_self:
            if any(hasattr(b, name) or _sets_on_self(b, name) for b in owners) and name not in listed:
                unlisted.add(f"{cls.__name__}.{name} (set on self, also upstream's)")
    assert not unlisted, f"not listed in trainer/upstream.py: {sorted(unlisted)}"


def test_each_entry_names_files_that_exist():
    """The list says where zerotune relies on each internal: files that moved must be followed (a stale path sends
    a reader to the wrong place when upstream changes)."""
    from pathlib import Path

    from trainer import upstream

    root = Path(__file__).resolve().parents[1]
    missing = [(e.name, f) for e in upstream.INTERNALS for f in (x.strip().split(" ")[0] for x in e.used_in.split(","))
               if not (root / f).is_file()]
    assert missing == []
