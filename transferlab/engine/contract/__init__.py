"""Plugin contract checks: build a backbone, head or task on tiny inputs and verify its contract.

``check_backbone``, ``check_head`` and ``check_task`` return ``CheckResult``s in the order the checks
ran; a failed check's ``detail`` says what was received and what the contract asks for. When a check
that later ones depend on fails (the factory builds, the object has the right type, ...), the list
ends with it. ``transferlab plugins check`` prints these results; tests call the same functions.
The contracts are documented in ``transferlab/{backbones,heads,tasks}/base.py`` and ``docs/plugins.md``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from transferlab.engine.assembly import TIMM_PREFIX, backbone_factory
from transferlab.engine.contract.backbone import DEFAULT_INPUT, check_backbone
from transferlab.engine.contract.checks import CheckResult, ContractViolation
from transferlab.engine.contract.head import check_head
from transferlab.engine.contract.task import check_task
from transferlab.registry import REGISTRIES, UnknownPluginError

KINDS = ("backbone", "head", "task")

__all__ = [
    "DEFAULT_INPUT",
    "KINDS",
    "AmbiguousPluginError",
    "CheckResult",
    "ContractViolation",
    "PluginReport",
    "check_backbone",
    "check_head",
    "check_plugin",
    "check_task",
    "resolve_kind",
]


class AmbiguousPluginError(ValueError):
    """A name is registered in more than one registry; the caller must say which kind."""


@dataclass(frozen=True)
class PluginReport:
    """Every check run on one plugin."""

    name: str
    kind: str
    source: str
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def resolve_kind(name: str, kind: str | None = None) -> str:
    """The kind of plugin ``name`` is; unknown names raise with close matches, ambiguous ones ask."""
    if kind is not None:
        if kind == "backbone":
            backbone_factory(name)
        else:
            REGISTRIES[kind].entry(name)
        return kind
    if name.startswith(TIMM_PREFIX):
        return "backbone"
    found = [k for k in KINDS if name in REGISTRIES[k]]
    if len(found) > 1:
        raise AmbiguousPluginError(
            f"'{name}' is registered as a {' and as a '.join(found)}; choose with --kind {'|'.join(found)}"
        )
    if found:
        return found[0]
    near = [
        REGISTRIES[k].unknown_message(name)
        for k in KINDS
        if difflib.get_close_matches(name, REGISTRIES[k].names(), n=1, cutoff=0.6)
        or any(f.name == name for f in REGISTRIES[k].failures())
    ]
    raise UnknownPluginError(
        "; ".join(near) or f"'{name}' is not a registered backbone, head or task (`transferlab plugins list`)"
    )


def check_plugin(
    name: str,
    kind: str | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    options: Mapping[str, Any] | None = None,
    tasks: Sequence[str] | None = None,
) -> PluginReport:
    """Check plugin ``name`` (of ``kind``, or of whichever registry holds it) against its contract.

    Args:
        name: A registered backbone, head or task, or ``timm/MODEL``.
        kind: "backbone", "head" or "task"; needed only when the name is registered as several.
        input_shape: (C, H, W) of the backbone check's input (default 3x32x32); backbones only.
        options: Keyword options for the factory, as a spec would give them.
        tasks: The tasks a head is checked with (default: every registered task it declares it fits).
    """
    kind = resolve_kind(name, kind)
    if input_shape is not None and kind != "backbone":
        raise ValueError(f"an input shape applies to backbones only; '{name}' is a {kind}")
    if tasks is not None and kind != "head":
        raise ValueError(f"tasks to pair with apply to heads only; '{name}' is a {kind}")
    registry = REGISTRIES[kind]
    if kind == "backbone":
        source = registry.entry("timm" if name.startswith(TIMM_PREFIX) else name).source
        checks = check_backbone(name, input_shape=input_shape or DEFAULT_INPUT, options=options)
    elif kind == "head":
        source = registry.entry(name).source
        checks = check_head(name, tasks=tasks, options=options)
    else:
        source = registry.entry(name).source
        checks = check_task(name, options=options)
    return PluginReport(name, kind, source, checks)
