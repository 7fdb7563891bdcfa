"""The exported rank/alpha pattern keys pick exactly their own module under both of PEFT's rules.

The two rules are written out here as PEFT applies them (``re.match`` of the key inside a fixed
regex against each target module's full name): ``(.*\\.)?(KEY)$`` since PEFT 0.15, and
``.*\\.KEY$`` up to 0.14, which needs a dot before the key. Real PEFT loads the exports in
test_peft_layout.py and test_export_cli.py (with whichever PEFT is installed).
"""
import re

import pytest
import timm

from sensitune.artifacts.peft_export import pattern_key

RULES = {
    "peft>=0.15": lambda key, name: re.match(rf"(.*\.)?({key})$", name) is not None,
    "peft<=0.14": lambda key, name: re.match(rf".*\.{key}$", name) is not None,
}

# names that trip suffix matching: shared tails (a.b.c / x.b.c), 1 vs 11, a name that is another's
# tail (b.c), regex characters, deep nesting
TRICKY = ["a.b.c", "x.b.c", "b.c", "blocks.1.attn.qkv", "blocks.11.attn.qkv", "blocks.1.attn.qkv_x",
          "stages.0.blocks.0.conv_pw", "stages.1.blocks.0.conv_pw", "m.l+1.fc", "m.l1.fc", "m.l.1.fc"]


def _names() -> list[str]:
    model = timm.create_model("test_vit", pretrained=False)
    return list(dict.fromkeys([n for n, _ in model.named_modules() if "." in n] + TRICKY))


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_dotted_key_matches_its_module_and_no_other(rule):
    names = _names()
    matches = RULES[rule]
    for name in names:
        key = pattern_key(name)
        assert [n for n in names if matches(key, n)] == [name], (rule, name, key)


def test_a_top_level_module_keeps_its_plain_name_which_only_the_new_rule_matches():
    # the documented limit: PEFT <= 0.14 cannot address a module with no dot in its name
    assert pattern_key("head") == "head"
    assert RULES["peft>=0.15"]("head", "head") and not RULES["peft>=0.15"]("head", "x.head_2")
    assert not RULES["peft<=0.14"]("head", "head")
