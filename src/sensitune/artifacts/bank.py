"""Many tasks on one frozen base: hold several deltas, switch the active one cheaply.

Each task gets a *shell*: a copy of the base's module tree whose frozen parameters and buffers
are the base's own tensors (shared, not copied), with the delta applied by the ordinary
:func:`load_delta` path. Only the tensors a task trains in full (head, biases, full tensors)
and BatchNorm statistics it carries are its own copies. Activating a task swaps the task's
touched modules (the owners of its units, topmost only) into the base tree, after putting back
the base modules of the previous task (references saved once, at construction). So a switch
costs a handful of attribute assignments — proportional to the number of modules the delta
touches, independent of the model's size — moves no weight data, and the active model is
exactly a freshly loaded model: same modules, same tensors, same outputs bit for bit.

Root-level tensors (a ViT's ``pos_embed``, ``cls_token``) cannot be reached by swapping a child
module; a task that tunes them swaps the tensor itself: its own copy for a ``full`` unit, and
``W + scatter(values)`` (computed once when the task is added, with the tuner's own function)
for a ``sparse`` unit.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sensitune.artifacts.delta import Delta, apply_delta, check_fingerprint, read_delta
from sensitune.artifacts.format import DeltaError
from sensitune.artifacts.merge import replaced_tensors


@dataclass
class _Task:
    delta: Delta
    shell: nn.Module
    sites: list[str]  # module paths (never the root) swapped in on activation
    root_tensors: dict[str, Tensor] = field(default_factory=dict)  # root-level params to swap


def _topmost(paths: set[str]) -> list[str]:
    """Drop paths that lie under another path of the set."""
    out = []
    for p in sorted(paths, key=lambda s: (s.count("."), s)):
        if not any(p.startswith(q + ".") for q in out):
            out.append(p)
    return out


class TaskBank:
    """Several task deltas over one base model; ``activate(name)`` switches the active task.

    ``bank = TaskBank(base); bank.add("digits", "runs/digits/delta"); model = bank.activate("digits")``.
    The returned model is ``base`` itself with the task's modules swapped in (use it in eval
    mode: the bank is for inference; training a shell would move weights shared with the base).
    """

    def __init__(self, base: nn.Module) -> None:
        from sensitune.tuners import applied_plan

        if applied_plan(base) is not None:
            raise ValueError("TaskBank needs the plain base model, but this model already has a plan applied")
        self.model = base
        self._fingerprints: dict[tuple[str, ...], str] = {}  # by the tensors a delta replaces (+ BN rule)
        self._base_modules = dict(base.named_modules())  # saved once: what deactivation restores
        self._base_root: dict[str, Tensor] = {}
        self._tasks: dict[str, _Task] = {}
        self.active: str | None = None

    # ------------------------------------------------------------------ tasks
    @property
    def names(self) -> list[str]:
        return list(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, name: str, delta: str | os.PathLike | Delta, *, force: bool = False) -> None:
        """Load ``delta`` (a folder or a read :class:`Delta`) as task ``name``."""
        if name in self._tasks:
            raise ValueError(f"task {name!r} is already in the bank; remove it first")
        delta = delta if isinstance(delta, Delta) else read_delta(delta)
        active = self.active
        self.deactivate()
        try:
            key = (*replaced_tensors(delta.plan), f"norm_stats={delta.has_norm_stats}")
            if self._fingerprints.get(key) != delta.meta["base_fingerprint"]:
                self._fingerprints[key] = check_fingerprint(self.model, delta, force=force)
            self._tasks[name] = self._build(delta, self._fingerprints[key])
        finally:
            if active is not None:
                self.activate(active)

    def remove(self, name: str) -> None:
        if self.active == name:
            self.deactivate()
        self._task(name)
        del self._tasks[name]

    def delta(self, name: str) -> Delta:
        return self._task(name).delta

    def _task(self, name: str) -> _Task:
        try:
            return self._tasks[name]
        except KeyError:
            raise KeyError(f"no task {name!r} in the bank (tasks: {self.names})") from None

    def _build(self, delta: Delta, fingerprint: str) -> _Task:
        plan = delta.plan
        owned = {u.target for u in plan.units if u.spec.replaces_base}
        owned |= set(plan.head)
        norm_bufs = {info["buffer"] for info in delta.meta["tensors"].values() if info.get("part") == "norm_stats"}
        memo: dict[int, object] = {}
        for n, p in self.model.named_parameters():
            if n not in owned:
                memo[id(p)] = p
        for n, b in self.model.named_buffers():
            if n not in norm_bufs:
                memo[id(b)] = b
        shell = copy.deepcopy(self.model, memo)
        apply_delta(shell, delta, fingerprint)
        shell.eval()

        # the head module always: the delta may have reset it to its own class count
        paths: set[str] = {n.rsplit(".", 1)[0] for n in plan.head if "." in n}
        root: dict[str, Tensor] = {}
        for u in plan.units:
            if u.module:
                paths.add(u.module)
            else:
                tensor = u.spec.root_tensor(shell, u)
                if tensor is None:
                    raise DeltaError(f"{delta.where}: a {u.mode} unit on the root module ({u.target}) cannot be swapped")
                root[u.leaf] = tensor
        paths |= {b.rsplit(".", 1)[0] for b in norm_bufs if "." in b}
        sites = _topmost(paths - {""})
        return _Task(delta=delta, shell=shell, sites=sites, root_tensors=root)

    # ------------------------------------------------------------------ switching
    def _set(self, path: str, module: nn.Module) -> None:
        parent, _, child = path.rpartition(".")
        self._base_modules[parent]._modules[child] = module

    def activate(self, name: str) -> nn.Module:
        """Make task ``name`` the active one and return the (shared) model."""
        task = self._task(name)
        if self.active == name:
            return self.model
        self.deactivate()
        for path in task.sites:
            self._set(path, task.shell.get_submodule(path))
        for leaf, t in task.root_tensors.items():
            self._base_root.setdefault(leaf, self.model._parameters[leaf])
            self.model._parameters[leaf] = t
        self.active = name
        return self.model

    def deactivate(self) -> nn.Module:
        """Put the base back (the plain base model is returned)."""
        if self.active is None:
            return self.model
        task = self._tasks[self.active]
        for path in task.sites:
            self._set(path, self._base_modules[path])
        for leaf in task.root_tensors:
            self.model._parameters[leaf] = self._base_root[leaf]
        self.active = None
        return self.model

    def touched(self, name: str) -> list[str]:
        """The module paths (and root tensors) a switch to ``name`` swaps."""
        task = self._task(name)
        return task.sites + [f"<root>.{leaf}" for leaf in task.root_tensors]
