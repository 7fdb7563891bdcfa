"""The scorer registry: names, options read off the signatures, checked before any work; score
options staged by a method (``score.*``) are what the scorer runs with."""
from __future__ import annotations

import pytest

from sensitune.commands.train import staged_overrides
from sensitune.engine.config import build_config
from sensitune.methods import get_method
from sensitune.scoring import DATA_FREE, METHODS, SCORERS, score
from .helpers import tensor_data, tiny_vit


def test_the_registry_lists_every_scorer_and_what_it_needs():
    assert METHODS == ("sensitivity", "gps", "magnitude", "random", "fisher")
    assert DATA_FREE == ("magnitude", "random")
    # fisher forwards its options to sensitivity: it takes them, not the name it records itself
    assert set(SCORERS["sensitivity"].options) - {"samples"} <= set(SCORERS["fisher"].options)
    assert "method" not in SCORERS["fisher"].options and "method" not in SCORERS["sensitivity"].options
    assert "seed" not in SCORERS["magnitude"].options and SCORERS["gps"].options["temperature"] is float


@pytest.mark.parametrize("method,options,message", [
    ("sensitivty", {}, r"unknown scoring method 'sensitivty' \(did you mean 'sensitivity'\?\); choose one of "
                       r"sensitivity, gps, magnitude, random, fisher"),
    ("sensitivity", {"batchs": 2}, r"unknown option 'batchs' \(did you mean 'batches'\?\); the scorer sensitivity "
                                   r"takes: batch_size \(int \| None\), batches"),
    ("sensitivity", {"batches": "2"}, r"option batches='2' has the wrong type: the scorer sensitivity expects int \| None"),
    ("gps", {"temperature": "hot"}, r"option temperature='hot' has the wrong type: the scorer gps expects float"),
    ("magnitude", {"seed": 0}, r"unknown option 'seed'; the scorer magnitude takes: kinds"),
])
def test_bad_scorer_names_and_options_are_refused_before_any_work(method, options, message):
    model = tiny_vit()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        score(model, tensor_data(4), method, **options)
    assert all((p == before[n]).all() for n, p in model.named_parameters())


def test_a_methods_scoped_score_options_are_what_the_scorer_runs_with():
    m = get_method("spt-lora")
    cfg = build_config(m.train, None, staged_overrides("spt-lora", [("score.batches", 2), ("score.batch_size", 2),
                                                                    ("score.include", r"blocks\.0\.")]))
    assert cfg.score_options == {"batches": 2, "batch_size": 2, "include": r"blocks\.0\."}
    m.check_options(cfg.method_options, {**m.score_options, **cfg.score_options})
    result = score(tiny_vit(), tensor_data(8), m.scorer, **{**m.score_options, **cfg.score_options})
    # 2 batches of 2 images (the preset's 16 x 32 overridden), and only block 0's tensors
    assert (result.meta["batches"], result.meta["samples"], result.meta["batch_size"]) == (2, 4, 2)
    assert result and all(name.startswith("blocks.0.") for name in result)


def test_the_score_command_offers_every_scorer_and_refuses_a_flag_its_scorer_does_not_take(tmp_path, capsys):
    from sensitune.cli import main
    from sensitune.commands.score import SCORER_NAMES

    assert sorted(SCORER_NAMES) == sorted(SCORERS)
    out = tmp_path / "s.safetensors"
    code = main(["score", "--model", "vit_tiny_patch16_224", "--task", "digits", "--method", "magnitude",
                 "--batches", "4", "--out", str(out)])
    assert code == 2 and "--batches does not apply to --method magnitude (it takes: kinds, include, exclude)" in \
        capsys.readouterr().err and not out.exists()
