"""Named methods: a method = a scorer + a planner + their options + training defaults.

``sensitune train --method spt-lora`` resolves here. Every preset says whether it takes a
budget, so a budget given to a method that has none is refused instead of silently ignored,
and a method that needs scores always computes them (no silent fallback to another method).
Learning rates are the defaults of the specs' recipes (AdamW, wd 1e-4, 0 on 1-D tensors);
the benchmark harness selects lr on val200 where it matters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping

from sensitune.options import check_call_options, did_you_mean, value_matches  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # pragma: no cover
    from sensitune.planning.registry import Planner
    from sensitune.scoring.registry import Scorer

Budget = Literal["none", "optional", "required"]
#: the stages an option can be scoped to: ``plan.rank``, ``score.batches``, ``train.drop_path``
SCOPES = ("plan", "score", "train")


@dataclass(frozen=True)
class StagedOptions:
    """Options sorted by the stage they go to: the planner's (``method_options``), the scorer's
    (``score_options``) and training settings (TrainConfig keys)."""

    plan: dict[str, Any] = field(default_factory=dict)
    score: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One named recipe. ``plan`` names a planner of :data:`sensitune.planning.PLANNERS`,
    ``scorer`` a scorer of :data:`sensitune.scoring.SCORERS` (their typed options live there).

    ``budget`` says for ``--help`` whether the method takes one (``optional``: it has
    ``default_budget``); whether a budget is taken is decided by the planner alone
    (:meth:`check_budget`), and a test holds the two in agreement. The registries are imported
    only when a method is used, so listing the methods imports no torch.
    """

    name: str
    description: str
    plan: str
    scorer: str | None = None
    budget: Budget = "none"
    default_budget: str | None = None
    plan_options: dict[str, Any] = field(default_factory=dict)
    score_options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig defaults

    @property
    def planner(self) -> "Planner":
        from sensitune.planning.registry import get_planner

        return get_planner(self.plan)

    @property
    def scorer_spec(self) -> "Scorer | None":
        if self.scorer is None:
            return None
        from sensitune.scoring.registry import get_scorer

        return get_scorer(self.scorer)

    def check_budget(self, budget: Any) -> Any:
        """The budget to plan with (the method's default when none is given); raises when this
        method takes none, needs one, or the budget is malformed: the same check as make_plan's."""
        planner = self.planner
        if budget is None and planner.budget == "required":
            budget = self.default_budget
        return planner.check_budget(budget, f"method {self.name!r}",
                                    f"; drop --budget, or use a budgeted method: {', '.join(budgeted())}")

    def check_options(self, plan_options: dict[str, Any] | None = None,
                      score_options: dict[str, Any] | None = None) -> None:
        """Refuse an option its planner (or scorer) does not take, or a value of the wrong type,
        before any work: the names and types come from the registries, and the error lists the
        valid ones."""
        self.planner.check({**self.plan_options, **(plan_options or {})}, f"method {self.name!r}")
        scorer = self.scorer_spec
        if scorer is not None:
            scorer.check({**self.score_options, **(score_options or {})}, f"method {self.name!r}")

    def stage_options(self, options: Mapping[str, Any], where: str) -> StagedOptions:
        """Sort ``options`` by stage. ``plan.NAME`` / ``score.NAME`` / ``train.NAME`` name their
        stage; a bare name goes to the one stage that has it (a planner option of this method or
        a training setting; scorer options are always scoped). A bare name that is both is
        refused naming both spellings, so it never silently lands in the wrong stage. Names and
        types of planner and scorer options are checked here; training settings by TrainConfig."""
        from sensitune.engine.config import check_keys, coerce_values, config_keys, translate_legacy_keys

        planner, scorer, train_keys = self.planner, self.scorer_spec, config_keys()
        staged = StagedOptions()
        for key, value in options.items():
            scope, dot, name = str(key).partition(".")
            if not dot:
                scope, name = self._bare_stage(str(key), planner, scorer, train_keys, where), str(key)
            elif scope not in SCOPES:
                raise ValueError(f"{where}: {key!r} names no stage {scope!r}{did_you_mean(scope, SCOPES)}; "
                                 f"scope an option as plan.NAME (the planner {self.plan}), score.NAME (the scorer"
                                 f"{' ' + self.scorer if self.scorer else ''}) or train.NAME (a training setting)")
            if scope == "score" and scorer is None:
                raise ValueError(f"{where}: method {self.name!r} computes no scores, so {key!r} has no stage to go to")
            stage = getattr(staged, scope)
            if name in stage:
                raise ValueError(f"{where}: {scope}.{name} is given twice (once scoped, once bare)")
            stage[name] = value
        _numbers_from_text(staged.plan, planner.options)
        planner.check(staged.plan, where)
        if scorer is not None:
            _numbers_from_text(staged.score, scorer.options)
            scorer.check(staged.score, where)
        translated = dict(translate_legacy_keys(staged.train, where))
        staged.train.clear()
        staged.train.update(translated)
        check_keys(staged.train, where)
        coerce_values(staged.train, where)  # a wrong type is refused now, not when the run starts
        return staged

    def _bare_stage(self, name: str, planner: "Planner", scorer: "Scorer | None", train_keys: set[str],
                    where: str) -> str:
        in_plan, in_train = name in planner.options, name in train_keys
        if in_plan and in_train:
            raise ValueError(f"{where}: {name!r} is ambiguous: it is an option of the planner {self.plan} and a "
                             f"training setting; write plan.{name}=... (the planner's) or train.{name}=... (the "
                             f"training setting)")
        if in_plan or in_train:
            return "plan" if in_plan else "train"
        if scorer is not None and name in scorer.options:
            raise ValueError(f"{where}: {name!r} is an option of the scorer {self.scorer}: write score.{name}=...")
        listing = ", ".join(planner.options) or "no options"
        raise ValueError(f"{where}: unknown option {name!r}{did_you_mean(name, [*planner.options, *train_keys])}; "
                         f"the planner {self.plan} takes: {listing}; any other name must be a training setting "
                         f"(one of {', '.join(sorted(train_keys))}), or scoped: plan.NAME, score.NAME, train.NAME")


def _numbers_from_text(options: dict[str, Any], declared: Mapping[str, Any]) -> None:
    """Turn ``"1e-3"`` into the float 1e-3, in place, where the option takes a float: YAML 1.1
    (PyYAML) reads an exponent without a dot as a string, which a float option would refuse."""
    for key, value in list(options.items()):
        hint = declared.get(key)
        if isinstance(value, str) and hint is not None and not value_matches(value, hint) and value_matches(1.0, hint):
            try:
                options[key] = float(value)
            except ValueError:
                pass  # not a number: the check names the expected type


def check_budget_syntax(budget: Any) -> None:
    """Refuse a budget that no model could satisfy (see :func:`sensitune.planning.budget.check_budget_syntax`)."""
    from sensitune.planning.budget import check_budget_syntax as check

    check(budget)


_SPT_SCORE = {"batches": 16, "batch_size": 32}  # SPT: 16 batches of 32 images, list order

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("linear", "linear probe: only the head trains", "linear", train={"lr": 1e-2}),
    Method("full", "full fine-tuning: every parameter trains", "full", train={"lr": 1e-4}),
    Method("bitfit", "BitFit: every bias and the head", "bitfit", train={"lr": 5e-3}),
    Method("lora", "LoRA rank 8 on every attention/MLP matrix (pointwise convs on CNNs)", "lora",
           train={"lr": 1e-3}),
    Method("adapter", "sequential bottleneck adapters (rank 8) on the same matrices as lora", "adapter",
           train={"lr": 1e-3}),
    Method("adaptformer", "AdaptFormer: parallel bottleneck (rank 8) beside every block's MLP", "adaptformer",
           train={"lr": 1e-3}),
    Method("spt-lora", "SPT: sensitivity-ranked budget; LoRA on sensitive matrices, sparse entries elsewhere",
           "spt-lora", scorer="sensitivity", budget="optional", default_budget="0.5%",
           score_options=_SPT_SCORE, train={"lr": 1e-3}),
    Method("spt-adapter", "SPT with adapters as the structured module", "spt-adapter", scorer="sensitivity",
           budget="optional", default_budget="0.5%", score_options=_SPT_SCORE, train={"lr": 1e-3}),
    Method("gps", "GPS: top-K gradient entries per row of every matrix (SupCon gradients), biases, head",
           "gps", scorer="gps", train={"lr": 2e-3, "weight_decay": 0.0}),
    Method("topk-sparse", "global top-k most sensitive entries, trained sparsely", "topk-sparse",
           scorer="sensitivity", budget="optional", default_budget="0.5%", score_options=_SPT_SCORE,
           train={"lr": 2e-3}),
    Method("bi-lora", "1-bit LoRA (rank 32) on the q and v slices of qkv", "bi-lora", train={"lr": 1e-3}),
    Method("bi-adaptformer", "1-bit AdaptFormer (rank 32)", "bi-adaptformer", train={"lr": 1e-3}),
    Method("ssf", "SSF: per-channel scale and shift after every biased Linear/Conv and norm layer", "ssf",
           train={"lr": 5e-3}),
]}


def budgeted() -> list[str]:
    return [n for n, m in METHODS.items() if m.budget != "none"]


def get_method(name: str | Method) -> Method:
    """The preset called ``name``; an unknown name lists the presets and the closest one."""
    if isinstance(name, Method):
        return name
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}{did_you_mean(str(name), METHODS)}; choose one of "
                         f"{', '.join(METHODS)}") from None


def describe() -> str:
    """One line per method, for ``--help``."""
    width = max(map(len, METHODS))
    return "\n".join(f"{m.name:<{width}}  {m.description}"
                     + (f" [budget, default {m.default_budget}]" if m.budget != "none" else "")
                     for m in METHODS.values())
