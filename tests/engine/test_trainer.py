"""The training loop: schedule, parameter groups, determinism, precision, non-finite loss."""
from __future__ import annotations

import math

import pytest
import torch

from engine_helpers import TinyTask, freeze_first_block, same_history, tiny_vit, trainable
from sensitune.engine.checkpoint import load_checkpoint
from sensitune.engine.config import build_config
from sensitune.engine.trainer import GlobalBatches, DistInfo, NonFiniteLossError, fit, make_scheduler, param_groups


def cfg(**kw):
    base = dict(epochs=2, batch_size=16, lr=1e-3, warmup_epochs=1, progress=False)
    base.update(kw)
    return build_config(overrides=base)


def test_schedule_warmup_then_cosine_by_hand():
    c = cfg(epochs=3, lr=0.1, warmup_epochs=1, warmup_lr=0.001, min_lr=0.01)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=c.lr)
    sched = make_scheduler(opt, c, steps_per_epoch=4)  # 12 steps, 4 of warm-up
    lrs = []
    for s in range(12):
        sched.step_update(s)
        lrs.append(opt.param_groups[0]["lr"])
    # warm-up: linear from 0.001 towards 0.1 in 4 steps
    assert lrs[:4] == pytest.approx([0.001, 0.001 + 0.099 / 4, 0.001 + 2 * 0.099 / 4, 0.001 + 3 * 0.099 / 4])
    # cosine over the remaining 8 steps: t = s - 4
    assert lrs[4] == pytest.approx(0.1)
    assert lrs[8] == pytest.approx(0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi * 4 / 8)))  # halfway: 0.055
    assert lrs[8] == pytest.approx(0.055)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] > 0.01


def test_param_groups_exempt_vectors_and_skip_frozen():
    model = tiny_vit()
    freeze_first_block(model)
    groups = param_groups(model, 0.05)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for p in groups[0]["params"]}
    plain = {by_id[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert "blocks.1.attn.qkv.weight" in decayed and "head.weight" in decayed
    assert "blocks.1.attn.qkv.bias" in plain and "blocks.1.norm1.weight" in plain and "norm.bias" in plain
    assert not any(n.startswith("blocks.0.") for n in decayed | plain)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | plain == expected and not decayed & plain


def test_global_batches_split_one_order_across_ranks():
    one = GlobalBatches(20, 8, seed=3, drop_last=False, info=DistInfo())
    two = [GlobalBatches(20, 8, seed=3, drop_last=False, info=DistInfo(r, 2, r)) for r in range(2)]
    for s in [one, *two]:
        s.epoch = 1
    b1 = list(one)
    b2 = [list(s) for s in two]
    assert [len(b) for b in b1] == [8, 8, 4]
    for k, batch in enumerate(b1):
        assert b2[0][k] + b2[1][k] == batch  # the same global batch, split in rank order
    assert sorted(i for b in b1 for i in b) == list(range(20))
    one.epoch = 2
    assert list(one) != b1  # reshuffled every epoch
    one.skip = 1
    one.epoch = 1
    assert list(one) == b1[1:]
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatches(20, 7, seed=0, drop_last=True, info=DistInfo(0, 2, 0))


def test_frozen_tensors_stay_bit_exact_and_trainable_ones_move():
    model = tiny_vit()
    freeze_first_block(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, TinyTask(32), cfg(weight_decay=0.1), log=lambda s: None)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


def test_seeded_runs_are_identical_and_seeds_matter():
    runs = []
    for seed in (0, 0, 1):
        model = tiny_vit(drop_path=0.1)
        r = fit(model, TinyTask(32, augment=True), cfg(seed=seed), log=lambda s: None)
        runs.append((trainable(model), r.history))
    for n in runs[0][0]:
        assert torch.equal(runs[0][0][n], runs[1][0][n]), n
    same_history(runs[0][1], runs[1][1])
    assert any(not torch.equal(runs[0][0][n], runs[2][0][n]) for n in runs[0][0])


def test_training_learns_the_tiny_task():
    model = tiny_vit()
    r = fit(model, TinyTask(48), cfg(epochs=6, lr=1e-3), log=lambda s: None)
    assert r.history[-1]["train_loss"] < 0.7 * r.history[0]["train_loss"]
    assert r.history[-1]["train_acc"] > 60  # chance is 33 %
    assert [h["step"] for h in r.history] == [3 * (e + 1) for e in range(6)]


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_epoch_loss_is_the_mean_cross_entropy_with_label_smoothing(smoothing):
    # with a vanishing lr the weights do not move, so the epoch loss is the initial model's mean loss
    data = TinyTask(32)
    model = tiny_vit()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(data.x), data.y, label_smoothing=smoothing).item()
    r = fit(model, data, cfg(epochs=1, lr=1e-12, warmup_lr=1e-12, min_lr=0, label_smoothing=smoothing),
            log=lambda s: None)
    assert r.history[0]["train_loss"] == pytest.approx(expected, rel=1e-4)
    assert r.history[0]["images"] == 32


def test_bf16_autocast_runs_on_cpu_and_fp16_needs_cuda():
    model = tiny_vit()
    r = fit(model, TinyTask(32), cfg(epochs=1, precision="bf16"), log=lambda s: None)
    assert math.isfinite(r.history[0]["train_loss"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs a CUDA"):
            fit(tiny_vit(), TinyTask(32), cfg(epochs=1, precision="fp16"), log=lambda s: None)


class PoisonAfter(TinyTask):
    """Returns a NaN image once ``bad_epoch`` starts (the dataset learns the epoch via a counter)."""

    def __init__(self, poison_from: int, **kw):
        super().__init__(**kw)
        self.calls, self.poison_from = 0, poison_from

    def __getitem__(self, i):
        self.calls += 1
        x, y = super().__getitem__(i)
        return (x * float("nan"), y) if self.calls > self.poison_from else (x, y)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = tiny_vit()
    data = PoisonAfter(poison_from=32 + 16, n=32)  # epoch 1 clean, epoch 2 step 2 poisoned
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss .* epoch 2, step 2") as err:
        fit(model, data, cfg(epochs=3), out_dir=tmp_path, log=lambda s: None)
    assert (f"the last checkpoint with finite weights is kept: {tmp_path / 'checkpoints' / 'last.pt'} "
            f"(after global step 2, the end of epoch 1)") in str(err.value)
    assert "\n" not in str(err.value)  # one line for the CLI
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 0 and len(ckpt["history"]) == 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    # the step that saw the NaN never reached the weights
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _poison_grad_at(model, step: int) -> None:
    """From optimizer step ``step`` (1-based) on, one trained tensor's gradient is infinite while
    the loss stays finite: only a check of the weights after the update can see it."""
    calls = {"n": 0}
    p = model.head.weight

    def hook(g):
        calls["n"] += 1
        return g * float("inf") if calls["n"] >= step else g
    p.register_hook(hook)


def test_non_finite_weights_after_an_update_stop_training_and_are_never_saved(tmp_path):
    model = tiny_vit()
    _poison_grad_at(model, step=7)  # epoch 1 = steps 1-4 (checkpoint), epoch 2 step 3 poisons the head
    with pytest.raises(NonFiniteLossError) as err:
        fit(model, TinyTask(32), cfg(epochs=3, batch_size=8), out_dir=tmp_path, log=lambda s: None)
    msg = str(err.value)
    assert msg.startswith("training stopped: non-finite weights in 1 of ")
    assert "(e.g. head.weight) after the update at epoch 2, step 3 (global step 7)" in msg
    assert "kept: " in msg and "(after global step 4, the end of epoch 1)" in msg
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert not torch.isfinite(model.head.weight).all()  # the bad step did happen in memory, and stopped there


def test_a_checkpoint_with_a_non_finite_tensor_is_never_written(tmp_path):
    model = tiny_vit()
    model.register_buffer("stat", torch.zeros(3))  # like a BatchNorm running statistic
    epochs_seen = []

    def poison(module, args):
        if len(epochs_seen) >= 5:  # the 5th forward onwards (epoch 2) corrupts the statistic
            module.stat.fill_(float("nan"))
        epochs_seen.append(1)
    model.register_forward_pre_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights in 1 trained tensor\(s\) \(e\.g\. stat\) "
                                                 r"when saving the checkpoint after global step 8 \(not written\)"):
        fit(model, TinyTask(32), cfg(epochs=3, batch_size=8), out_dir=tmp_path, log=lambda s: None)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["global_step"] == 4 and torch.equal(ckpt["model"]["stat"], torch.zeros(3))


def test_resuming_from_a_non_finite_checkpoint_is_refused(tmp_path):
    from sensitune.engine.checkpoint import save_checkpoint

    fit(tiny_vit(), TinyTask(16), cfg(epochs=1), out_dir=tmp_path, log=lambda s: None)
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(path)
    ckpt["model"]["head.bias"][0] = float("nan")  # an old run, written before weights were checked
    save_checkpoint(path, **{k: v for k, v in ckpt.items() if k != "format"})
    with pytest.raises(ValueError, match=r"cannot resume .*non-finite weights \(1 tensor\(s\), e\.g\. head\.bias\)"):
        fit(tiny_vit(), TinyTask(16), cfg(epochs=1), out_dir=tmp_path, resume=True, log=lambda s: None)


def test_no_trainable_parameter_is_an_error():
    model = tiny_vit()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        fit(model, TinyTask(16), cfg(epochs=1), log=lambda s: None)


def test_too_few_samples_for_a_full_batch_is_an_error():
    with pytest.raises(ValueError, match="no full batch"):
        fit(tiny_vit(), TinyTask(8), cfg(epochs=1, batch_size=16), log=lambda s: None)


def test_grad_clip_limits_the_update():
    # AdamW divides by sqrt(v) + eps: gradients clipped to a global norm far below eps barely move a weight
    moved = {}
    for clip in (None, 1e-12):
        model = tiny_vit()
        before = trainable(model)
        fit(model, TinyTask(16), cfg(epochs=1, warmup_epochs=0, grad_clip=clip), log=lambda s: None)
        after = trainable(model)
        moved[clip] = max((after[n] - before[n]).abs().max().item() for n in before)
    assert moved[None] > 1e-4
    assert moved[1e-12] < 1e-3 * moved[None]


def test_eval_every_adds_eval_columns(tmp_path):
    model = tiny_vit()
    r = fit(model, TinyTask(32), cfg(epochs=3, eval_every=1), eval_data=TinyTask(12, seed=5), out_dir=tmp_path,
            log=lambda s: None)
    # epochs 1 and 2 carry the periodic evaluation; the final one is the caller's (train() evaluates once more)
    assert ["eval_acc" in row for row in r.history] == [True, True, False]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:8] == ["epoch", "step", "lr", "train_loss", "train_acc", "images", "epoch_seconds", "images_per_s"]
    assert "eval_acc" in header and r.last_eval["num_samples"] == 12


def test_tensorboard_is_optional(tmp_path):
    notes = []
    fit(tiny_vit(), TinyTask(16), cfg(epochs=1, tensorboard=True), out_dir=tmp_path, log=notes.append)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert any("tensorboard: not installed" in n for n in notes)
    else:
        assert any((tmp_path / "tensorboard").iterdir())


def test_divergence_rule_on_hand_made_histories():
    from sensitune.engine.trainer import divergence

    assert divergence([{"train_loss": 1.0, "start_loss": 1.1}, {"train_loss": 0.5}]) is None
    assert "above where it started (1.1)" in divergence([{"train_loss": 1.0, "start_loss": 1.1},
                                                         {"train_loss": 1.2}])
    assert "nan" in divergence([{"train_loss": 1.0, "start_loss": 1.1}, {"train_loss": float("nan")}])
    assert divergence([{"train_loss": 2.0}, {"train_loss": 2.5}]) is not None  # no start_loss: first epoch's mean
    # a collapse ends a hair above ln C: the message shows the digits that make "above" visible
    flat = divergence([{"train_loss": 1.80, "start_loss": 1.7917595}, {"train_loss": 1.7918}])
    assert "ended at 1.7918, above where it started (1.79176): it learned nothing" in flat


def test_fit_records_the_loss_before_any_update_and_a_too_large_lr_is_flagged(tmp_path):
    """The first batch's loss with a zero head is ln C exactly; lr 5 on a small model ends far above it."""
    import math

    from engine_helpers import TinyTask, tiny_vit
    from sensitune.engine.config import build_config
    from sensitune.engine.trainer import divergence, fit

    model = tiny_vit()
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    cfg = build_config(overrides=dict(epochs=2, batch_size=8, lr=1e-3, warmup_epochs=0, progress=False))
    r = fit(model, TinyTask(32), cfg, log=lambda s: None)
    assert r.history[0]["start_loss"] == pytest.approx(math.log(3), abs=1e-6)
    assert "start_loss" not in r.history[1] and divergence(r.history) is None
    bad = fit(tiny_vit(), TinyTask(32), build_config(overrides=dict(
        epochs=3, batch_size=8, lr=5.0, warmup_epochs=0, progress=False)), log=lambda s: None)
    assert divergence(bad.history) is not None


def test_score_options_count_as_a_changed_setting_in_both_directions():
    """A run made with scorer options is not the same run without them, nor the reverse; a run
    made before score_options existed (key absent) equals one with none."""
    from sensitune.engine.trainer import settings_diff

    with_opts = build_config(None, {"score_options": {"batches": 8}})
    without = build_config(None, {})
    assert settings_diff(with_opts.to_dict(), without) == {"score_options": ({"batches": 8}, {})}
    assert settings_diff(without.to_dict(), with_opts) == {"score_options": ({}, {"batches": 8})}
    assert "score_options" not in without.to_dict() and settings_diff(without.to_dict(), without) == {}
