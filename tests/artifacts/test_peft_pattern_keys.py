"""The exported rank/alpha pattern keys resolve to exactly their own module under both of PEFT's
lookups, written out here as PEFT does them: the first key ``k`` (in the config's order) with
``re.match(rf"(.*\\.)?({k})$", name)`` since PEFT 0.15, or ``re.match(rf".*\\.{k}$", name)`` up to
0.14 (a dot must precede the key), else the module's own name. Real PEFT loads the exports in
test_peft_layout.py and test_export_cli.py (with whichever PEFT is installed).
"""
import re

import pytest
import timm

from sensitune.artifacts.peft_export import pattern_key, pattern_order

RULES = {
    "peft>=0.15": lambda key, name: re.match(rf"(.*\.)?({key})$", name) is not None,
    "peft<=0.14": lambda key, name: re.match(rf".*\.{key}$", name) is not None,
}

# names that trip suffix matching: shared tails (a.b.c / x.b.c), 1 vs 11, a name that is another's
# tail (b.c), regex characters, deep nesting, top-level names that end dotted ones (head / x.head)
TRICKY = ["a.b.c", "x.b.c", "b.c", "blocks.1.attn.qkv", "blocks.11.attn.qkv", "blocks.1.attn.qkv_x",
          "stages.0.blocks.0.conv_pw", "stages.1.blocks.0.conv_pw", "m.l+1.fc", "m.l1.fc", "m.l.1.fc",
          "head", "x.head", "fc", "aux.fc", "aux"]


def _lookup(rule: str, keys: list[str], name: str) -> str:
    return next((k for k in keys if RULES[rule](k, name)), name)


def _names() -> list[str]:
    model = timm.create_model("test_vit", pretrained=False)
    return list(dict.fromkeys([n for n, _ in model.named_modules() if n] + TRICKY))


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_module_resolves_to_its_own_key(rule):
    names = _names()
    keys = [pattern_key(n) for n in pattern_order(names)]
    for name in names:
        assert _lookup(rule, keys, name) == pattern_key(name), (rule, name)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_top_level_keys_written_first_would_capture_dotted_modules(rule):
    # why pattern_order puts top-level names last: 'head' matches 'x.head' under both rules
    assert pattern_order(["head", "x.head"]) == ["x.head", "head"]
    assert _lookup(rule, [pattern_key("head"), pattern_key("x.head")], "x.head") == "head"


def test_the_plain_escaped_name_is_missed_by_the_old_rule():
    # what 0.1's exporter wrote: PEFT <= 0.14 fell back to the name, which is not a key
    key = re.escape("blocks.0.attn.qkv")
    assert _lookup("peft>=0.15", [key], "blocks.0.attn.qkv") == key
    assert _lookup("peft<=0.14", [key], "blocks.0.attn.qkv") != key
