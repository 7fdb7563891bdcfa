"""The README's Python example runs as written, and what it ends with holds up."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_example_runs_and_its_delta_round_trips(tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert len(blocks) == 1, "the README should hold exactly one runnable Python example"
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__readme__"}
    exec(compile(blocks[0], str(README), "exec"), ns)  # noqa: S102 - our own README

    assert (tmp_path / "digits-scores.safetensors").is_file()
    assert {p.name for p in (tmp_path / "digits-delta").iterdir()} >= {"delta.json", "delta.safetensors"}
    plan, model, tuned, plain = ns["plan"], ns["model"], ns["tuned"], ns["plain"]
    backbone = ns["scores"].meta["backbone_params"]  # counted before apply_plan added its own tensors
    assert abs(plan.num_trainable(include_head=False) - 0.005 * backbone) <= 0.01 * 0.005 * backbone  # 0.5 %, within 1 %
    x = torch.stack([ns["train_set"][i][0] for i in range(4)])
    for m in (model, tuned, plain):
        m.eval()
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(tuned(x), ref, rtol=0, atol=0)  # the reloaded delta is the trained model
        torch.testing.assert_close(plain(x), ref, rtol=1e-3, atol=1e-3)  # float32 merge, 16 blocks of rounding
        # in float64 the merge itself must be exact: fold the delta into a float64 copy and compare
        merged64 = ns["st"].merge(tuned.double()).eval()
        torch.testing.assert_close(merged64(x.double()), tuned(x.double()), rtol=1e-9, atol=1e-9)
    assert type(plain).__module__.startswith("timm"), "merge must give a plain timm model"
