"""setup.py's floors and caps: every one parses, the installed libraries satisfy them, the caps are the ranges
trainer/upstream.py is tested with, and torch's floor is no older than the releases that made public what the code
uses. (The Trainer, accelerate and PEFT internals themselves: tests/test_upstream.py.)"""

import ast
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from trainer import upstream

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, Requirement]:
    """Every requirement setup.py declares (install_requires and each extra), by name; a malformed one raises."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    given = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    lines = given["install_requires"] + [r for extra in given["extras_require"].values() for r in extra]
    return {Requirement(line).name: Requirement(line) for line in lines}


def _floor(requirement: Requirement) -> Version:
    floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{requirement} should state one floor"
    return floors[0]


@pytest.mark.parametrize("name", sorted(_requirements()))
def test_the_installed_release_satisfies_setup_py(name):
    requirement = _requirements()[name]
    try:
        found = version(name)
    except PackageNotFoundError:
        pytest.skip(f"{name} is not installed here")
    assert requirement.specifier.contains(found, prereleases=True), f"{name} {found} is outside {requirement}"


def test_setup_py_caps_each_library_at_its_tested_range():
    requirements = _requirements()
    for name, tested in upstream.TESTED.items():
        assert requirements[name].specifier == SpecifierSet(tested), (name, str(requirements[name].specifier), tested)
        assert any(s.operator == "<" for s in requirements[name].specifier), f"{name} has no cap"


# Where torch made public what zerotune uses (torch's release notes), and how the code spells it: the floor in
# setup.py may be no older than the newest of these.
TORCH_FEATURES = {
    "FSDP2's fully_shard in torch.distributed.fsdp (before: torch.distributed._composable)": (
        "2.6", r"from torch\.distributed\.fsdp import [^\n]*fully_shard"),
    "scaled_dot_product_attention(enable_gqa=)": ("2.5", r"enable_gqa="),
    "torch.distributed.checkpoint.state_dict (get_state_dict, StateDictOptions)": (
        "2.2", r"from torch\.distributed\.checkpoint\.state_dict import"),
    "scaled_dot_product_attention(scale=)": ("2.1", r"scaled_dot_product_attention\(.{0,300}?\bscale="),
}


def test_torch_floor_covers_what_the_code_uses():
    code = "\n".join(p.read_text() for p in (ROOT / "trainer").rglob("*.py"))
    for feature, (since, spelled) in TORCH_FEATURES.items():
        # A feature the code no longer uses would keep the floor up for nothing: the table follows the code.
        assert re.search(spelled, code, re.S), f"trainer/ no longer uses {feature}; drop it from TORCH_FEATURES"
    floor = _floor(_requirements()["torch"])
    newest = max(Version(since) for since, _ in TORCH_FEATURES.values())
    assert floor >= newest, f"setup.py asks torch>={floor}, but the code uses what torch {newest} made public"
