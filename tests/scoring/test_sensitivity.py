"""SPT sensitivity against an independent per-batch loop, and the baselines."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sensitune.scoring import ScoreMap, score

from .helpers import EXCLUDED, tensor_data, tiny_effnet, tiny_vit


def _expected_names(model):
    return [n for n, _ in model.named_parameters() if not n.startswith(EXCLUDED)]


def _loop_sum_of_squares(model, data, batch_size, n_batches):
    """Written out: zero the gradient, mean CE of the batch, backward, square, add."""
    names = _expected_names(model)
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    model.train()
    for b in range(n_batches):
        x = torch.stack([data[i][0] for i in range(b * batch_size, (b + 1) * batch_size)])
        y = torch.stack([data[i][1] for i in range(b * batch_size, (b + 1) * batch_size)])
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n in names:
            total[n] += params[n].grad ** 2
    model.zero_grad(set_to_none=True)
    return total


def test_sum_of_squared_per_batch_gradients_matches_a_written_out_loop():
    model, data = tiny_vit(), tensor_data(12)
    scores = score(model, data, "sensitivity", batch_size=4, batches=3)
    expected = _loop_sum_of_squares(model, data, 4, 3)
    assert list(scores) == list(expected)  # everything but head, cls/pos/patch embeddings, in order
    for n, t in expected.items():
        assert scores[n].dtype == torch.float32 and scores[n].device.type == "cpu"
        torch.testing.assert_close(scores[n], t, rtol=1e-5, atol=1e-12)
    assert scores.meta["samples"] == 12 and scores.meta["batches"] == 3 and scores.meta["method"] == "sensitivity"
    assert len(scores.meta["model_fingerprint"]) == 64


def test_sum_of_squares_is_not_the_square_of_the_sum():
    model, data = tiny_vit(), tensor_data(12)
    per_batch = score(model, data, "sensitivity", batch_size=4, batches=3)
    one_batch = score(model, data, "sensitivity", batch_size=12, batches=1)
    name = "blocks.0.attn.qkv.weight"
    # Σ_b g_b² ≥ (Σ_b g_b)²/B (Cauchy–Schwarz) and differs from the one-batch square in general
    assert not torch.allclose(per_batch[name], one_batch[name], rtol=1e-2)


def test_batchnorm_model_in_eval_mode_matches_loop_with_bn_eval():
    model, data = tiny_effnet(), tensor_data(8)
    scores = score(model, data, "sensitivity", batch_size=4, batches=2, train_mode=False)
    params = dict(model.named_parameters())
    model.eval()
    ref = {n: torch.zeros_like(params[n]) for n in scores}
    for b in range(2):
        x, y = data.tensors[0][4 * b:4 * b + 4], data.tensors[1][4 * b:4 * b + 4]
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n in ref:
            ref[n] += params[n].grad ** 2
    assert "conv_stem.weight" in scores and "classifier.weight" not in scores
    for n in ref:
        torch.testing.assert_close(scores[n], ref[n], rtol=1e-5, atol=1e-14)


def test_fewer_samples_than_asked_warns_and_uses_what_exists():
    model, data = tiny_vit(), tensor_data(6)
    with pytest.warns(UserWarning, match="only 6"):
        scores = score(model, data, "sensitivity", batch_size=4)  # default 16 x 4 asked
    assert scores.meta["samples"] == 6 and scores.meta["batches"] == 2
    # the short last batch is a batch of its own (mean over its 2 samples)
    expected = _loop_sum_of_squares(model, torch.utils.data.TensorDataset(*[t[:4] for t in data.tensors]), 4, 1)
    model.zero_grad()
    F.cross_entropy(model(data.tensors[0][4:]), data.tensors[1][4:]).backward()
    name = "blocks.1.mlp.fc2.weight"
    torch.testing.assert_close(scores[name], expected[name] + dict(model.named_parameters())[name].grad ** 2,
                               rtol=1e-5, atol=1e-12)


def test_bad_input_is_refused_clearly():
    model = tiny_vit()
    with pytest.raises(ValueError, match="empty"):
        score(model, tensor_data(0), "sensitivity")
    with pytest.raises(ValueError, match="nothing to score"):
        score(model, tensor_data(4), "sensitivity", include=r"^no_such_tensor$")
    with pytest.raises(ValueError, match="unknown tensor kind"):
        score(model, tensor_data(4), "sensitivity", kinds=("matrices",))
    with pytest.raises(ValueError, match=r"unknown scoring method 'sensitivty' \(did you mean 'sensitivity'\?\)"):
        score(model, tensor_data(4), "sensitivty")
    with pytest.raises(ValueError, match="needs data"):
        score(model, None, "sensitivity")
    with pytest.raises(ValueError, match="takes part in the loss"):
        score(model, tensor_data(4), "gps", kinds=("head",), view_transform=lambda x: x)  # SupCon skips the head
    with pytest.raises(ValueError, match=r"unknown option 'temprature'; the scorer sensitivity takes: batch_size"):
        score(model, tensor_data(4), "sensitivity", temprature=0.1)


def test_non_finite_loss_or_gradients_raise():
    model = tiny_vit()
    bad = tensor_data(4)
    bad.tensors[0][1, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="batch 0"):
        score(model, bad, "sensitivity", batch_size=4)

    class SqrtNet(torch.nn.Module):  # finite loss, NaN gradient: sqrt'(0) * abs'(0) = inf * 0
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 3)
            self.head = torch.nn.Linear(3, 3)
            with torch.no_grad():
                self.body.weight.zero_()
                self.body.bias.zero_()

        def forward(self, x):
            return self.head(torch.sqrt(torch.abs(self.body(x.flatten(1)[:, :4]))))

    with pytest.raises(FloatingPointError, match="body.weight"):
        score(SqrtNet(), tensor_data(4), "sensitivity", batch_size=2)


def test_dataloader_input_uses_its_dataset_and_batch_size():
    model, data = tiny_vit(), tensor_data(8)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    a = score(model, loader, "sensitivity")
    b = score(model, data, "sensitivity", batch_size=4, batches=2)
    assert a.meta["batches"] == 2
    for n in a:
        torch.testing.assert_close(a[n], b[n])


def test_drop_path_scores_are_seeded_and_leave_the_callers_rng_alone():
    model, data = tiny_vit(drop_path_rate=0.5), tensor_data(8)
    torch.manual_seed(123)
    a = score(model, data, "sensitivity", batch_size=2, batches=4)
    after = torch.rand(1)
    torch.manual_seed(123)
    b = score(model, data, "sensitivity", batch_size=2, batches=4)
    assert torch.equal(torch.rand(1), after)
    c = score(model, data, "sensitivity", batch_size=2, batches=4, seed=1)
    name = "blocks.1.mlp.fc1.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])


def test_magnitude_random_and_fisher_baselines():
    model, data = tiny_vit(), tensor_data(4)
    mag = score(model, None, "magnitude")
    params = dict(model.named_parameters())
    assert list(mag) == _expected_names(model)
    for n in mag:
        assert torch.equal(mag[n], params[n].detach().abs())
    r1, r2, r3 = (score(model, None, "random", seed=s) for s in (7, 7, 8))
    assert all(torch.equal(r1[n], r2[n]) for n in r1) and not torch.equal(r1["norm.weight"], r3["norm.weight"])
    assert all(float(t.min()) >= 0 and float(t.max()) < 1 for t in r1.values())
    fisher = score(model, data, "fisher", samples=3)
    assert fisher.meta["samples"] == 3
    expected = _loop_sum_of_squares(model, data, 1, 3)
    for n in fisher:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-5, atol=1e-12)


def test_scoremap_round_trip_and_refuses_foreign_files(tmp_path):
    model, data = tiny_vit(), tensor_data(4)
    scores = score(model, data, "sensitivity", batch_size=2, batches=2)
    path = scores.save(tmp_path / "sub" / "s.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["s.safetensors"]  # no temp file left
    back = ScoreMap.load(path)
    assert list(back) == list(scores) and back.meta == scores.meta
    assert all(torch.equal(back[n], scores[n]) for n in scores)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a sensitune score file"):
        ScoreMap.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable"):
        ScoreMap.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        ScoreMap.load(tmp_path / "missing.safetensors")


class _SharedLayer(torch.nn.Module):
    """One Linear applied twice per forward: its gradient has two parts autograd must sum first."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        h = x.flatten(1)[:, :6]
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(h)))))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_reused_parameter_scores_the_square_of_its_whole_batch_gradient(dtype):
    model, data = _SharedLayer().to(dtype), tensor_data(8)
    data.tensors = (data.tensors[0].to(dtype), data.tensors[1])
    scores = score(model, data, "sensitivity", batch_size=4, batches=2, fingerprint=False)
    assert list(scores) == ["fc.weight", "fc.bias"]
    expected = {n: torch.zeros(p.shape, dtype=torch.promote_types(dtype, torch.float32))
                for n, p in model.named_parameters() if n.startswith("fc.")}
    for b in range(2):
        x, y = data.tensors[0][4 * b:4 * b + 4], data.tensors[1][4 * b:4 * b + 4]
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            if n in expected:
                expected[n] += p.grad.to(expected[n].dtype) ** 2  # (part 1 + part 2)², not part 1² + part 2²
    for n, t in expected.items():
        torch.testing.assert_close(scores[n].to(t.dtype), t, rtol=1e-6, atol=0)
