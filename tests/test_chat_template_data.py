"""The models' own chat templates stored under tests/data/chat_templates (see SOURCES.md there): each file is
still the verbatim string it was taken as, and each renders a system+user+assistant+user conversation through
transformers' apply_chat_template with the user turns and the assistant reply in order."""

import hashlib
from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError

from tiny import build_tokenizer

DATA = Path(__file__).resolve().parent / "data" / "chat_templates"

# sha256 of each file's bytes as stored: the files are byte-exact copies (no trailing newline added), so an editor
# or a formatter that touches one breaks this, not a later comparison with the model's rendering.
SHA256 = {
    "deepseek_r1.jinja": "563b1ce7d61d50a9b4c7439a912a1116f095b712df5b5e4d3e1116049874eb64",
    "deepseek_r1_distill.jinja": "56a1447ad31926fdc21fb07e56e5642bd9c850c4f52d8c8af7bbe5f079a84f5f",
    "deepseek_v3_1.jinja": "d9f5f351b276cf9e81d009db08830db7d38e94927aecd09a7beb43e2aafee94e",
    "gemma2.jinja": "ecd6ae513fe103f0eb62e8ab5bfa8d0fe45c1074fa398b089c93a7e70c15cfd6",
    "gemma3.jinja": "7de1c58e208eda46e9c7f86397df37ec49883aeece39fb961e0a6b24088dd3c4",
    "glm4.jinja": "27288f957f8364c990a2ce13bf5f8bf86921c4bce467ce698c76dcc69466d821",
    "glm4_5.jinja": "44f815868bf02fa458dd2f741a338046f4bf45f398eb6d067766726b9d96cce3",
    "llama3_1.jinja": "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65",
    "llama3_2.jinja": "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4",
    "llama4.jinja": "95a231a15c8c976ac511e62c6fdf477ea9e3ca7a87cbb9974e0dd653eccb4563",
    "mistral_nemo.jinja": "e4676cb56dffea7782fd3e2b577cfaf1e123537e6ef49b3ec7caa6c095c62272",
    "mistral_v0_3.jinja": "e16746b40344d6c5b5265988e0328a0bf7277be86f1c335156eae07e29c82826",
    "phi4.jinja": "fe4120415a3858b873955c92ce3a103a95bc97c2cb00b72e62659aaf0f891ee5",
    "phi4_mini.jinja": "febf589225c9728ab791f52e8897d7607a823d45368f0a4c92fa68997b40cce9",
    "qwen2_5.jinja": "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",
    "qwen3.jinja": "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8",
    "smollm2.jinja": "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788",
}

# Templates that refuse a system message outright (raise_exception in the template itself).
NO_SYSTEM = {"gemma2.jinja"}

SYSTEM, USER1, REPLY, USER2 = "SYS-7f3a", "USER-ONE-51c2", "REPLY-ONE-9d0e", "USER-TWO-2b8f"
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER1},
    {"role": "assistant", "content": REPLY},
    {"role": "user", "content": USER2},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_the_stored_files_are_the_listed_ones_byte_for_byte():
    stored = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in DATA.glob("*.jinja")}
    assert stored == SHA256
    sources = (DATA / "SOURCES.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in sources for name in SHA256)


@pytest.mark.parametrize("name", sorted(SHA256))
def test_template_renders_the_conversation_in_order(tokenizer, name):
    template = (DATA / name).read_text(encoding="utf-8")
    render = lambda messages: tokenizer.apply_chat_template(  # noqa: E731
        messages, chat_template=template, tokenize=False, add_generation_prompt=True,
        bos_token="<BOS-x>", eos_token="<EOS-x>", date_string="26 Jul 2024")
    messages = CONVERSATION
    if name in NO_SYSTEM:
        with pytest.raises(TemplateError, match="System role not supported"):
            render(CONVERSATION)
        messages = CONVERSATION[1:]
    out = render(messages)
    assert isinstance(out, str)
    positions = [out.find(text) for text in (USER1, REPLY, USER2)]
    assert -1 not in positions and positions == sorted(positions), out
    assert all(out.count(text) == 1 for text in (USER1, REPLY, USER2)), out
    if name not in NO_SYSTEM:
        assert out.count(SYSTEM) == 1, out
