"""Typed name -> factory registries, one per plugin kind, with entry-point discovery.

Built-in plugins register with a decorator when their module is imported; the registry imports
those modules lazily on first lookup, then loads the entry-point group, so importing
``transferlab`` has no side effects and a plugin that fails to import is reported, not fatal.
"""

from __future__ import annotations

import difflib
import importlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable[..., object])

BUILTIN_SOURCE = "transferlab"


class RegistryError(Exception):
    """A registry is inconsistent (for example, two plugins claim one name)."""


class UnknownPluginError(KeyError):
    """A name is not registered; the message lists close matches."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[F]):
    """One registered plugin."""

    name: str
    kind: str
    factory: F
    source: str
    description: str


@dataclass(frozen=True)
class LoadFailure:
    """An entry point that could not be imported."""

    name: str
    kind: str
    source: str
    target: str
    error: str


def first_doc_line(obj: object) -> str:
    """The first line of ``obj``'s docstring, or an empty string."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


class Registry(Generic[F]):
    """Maps names to factories of one kind.

    Args:
        kind: What the registry holds ("backbone", "head", "task", ...), used in messages.
        entry_point_group: The ``importlib.metadata`` group third-party packages register under.
        builtin_modules: Modules of this package that register built-ins when imported.
    """

    def __init__(self, kind: str, *, entry_point_group: str, builtin_modules: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._builtin_modules = builtin_modules
        self._entries: dict[str, Entry[F]] = {}
        self._failures: list[LoadFailure] = []
        self._loaded = False
        self._loading = False
        self._load_error: RegistryError | None = None
        self._lock = threading.RLock()

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str | None = None, *, description: str | None = None) -> Callable[[F], F]:
        """Decorator that registers a built-in factory under ``name`` (default: its ``__name__``)."""

        def decorator(factory: F) -> F:
            self.add(name or factory.__name__, factory, source=BUILTIN_SOURCE, description=description)
            return factory

        return decorator

    def add(self, name: str, factory: F, *, source: str, description: str | None = None) -> None:
        """Register ``factory``; a name that is taken is an error naming both sources."""
        with self._lock:
            if name in self._entries:
                old = self._entries[name]
                raise RegistryError(
                    f"{self.kind} '{name}' is registered twice: by '{old.source}' and by '{source}'; "
                    "rename one of them"
                )
            desc = description if description is not None else first_doc_line(factory)
            self._entries[name] = Entry(name, self.kind, factory, source, desc)

    def remove(self, name: str) -> None:
        """Drop a registration (tests and plugin development)."""
        with self._lock:
            self._entries.pop(name, None)

    # -- discovery ----------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        # ``_loading`` is read under the (re-entrant) lock: the loading thread re-enters while a
        # plugin module registers itself, other threads wait for the whole registry.
        with self._lock:
            if self._load_error is not None:  # the same error every time, not a half-loaded retry
                raise self._load_error
            if self._loaded or self._loading:
                return
            self._loading = True
            try:
                for module in self._builtin_modules:
                    importlib.import_module(module)
                for ep in entry_points(group=self.entry_point_group):
                    self._load_entry_point(ep)
                self._loaded = True
            except RegistryError as exc:
                self._load_error = exc
                raise
            finally:
                self._loading = False

    def _load_entry_point(self, ep: EntryPoint) -> None:
        source = ep.dist.name if ep.dist is not None else "<unknown distribution>"
        try:
            factory = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, never fatal
            self._failures.append(
                LoadFailure(ep.name, self.kind, source, ep.value, f"{type(exc).__name__}: {exc}")
            )
            return
        existing = self._entries.get(ep.name)
        if existing is not None and existing.factory is factory:
            # The plugin also used the @register decorator on import: one plugin, its package the source.
            self._entries[ep.name] = Entry(ep.name, self.kind, factory, source, existing.description)
            return
        self.add(ep.name, factory, source=source)

    # -- lookup -------------------------------------------------------------------------------
    def get(self, name: str) -> F:
        """The factory registered as ``name``; unknown names raise with close matches."""
        return self.entry(name).factory

    def entry(self, name: str) -> Entry[F]:
        """The full entry for ``name``."""
        self._ensure_loaded()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownPluginError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        """A message for an unregistered ``name`` with close matches and how to list all."""
        self._ensure_loaded()
        matches = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""
        broken = [f.name for f in self._failures if f.name == name]
        extra = f" (plugin '{name}' failed to import; see `transferlab plugins list`)" if broken else ""
        return (
            f"{self.kind} '{name}' is not registered{hint}{extra} "
            f"(`transferlab plugins list --kind {self.kind}` lists them)"
        )

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._ensure_loaded()
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return list(self)

    def entries(self) -> list[Entry[F]]:
        """All entries, sorted by name."""
        self._ensure_loaded()
        return [self._entries[n] for n in sorted(self._entries)]

    def failures(self) -> list[LoadFailure]:
        """Entry points that failed to import."""
        self._ensure_loaded()
        return list(self._failures)


BACKBONES: Registry[Callable[..., object]] = Registry(
    "backbone",
    entry_point_group="transferlab.backbones",
    builtin_modules=(
        "transferlab.backbones.small",
        "transferlab.backbones.timm_backbone",
        "transferlab.backbones.timm_zoo",
        "transferlab.backbones.torchvision_zoo",
        "transferlab.backbones.cifar",
        "transferlab.backbones.sequence",
    ),
)
HEADS: Registry[Callable[..., object]] = Registry(
    "head",
    entry_point_group="transferlab.heads",
    builtin_modules=(
        "transferlab.heads.classify",
        "transferlab.heads.fcn",
        "transferlab.heads.unet",
        "transferlab.heads.conv1d",
        "transferlab.heads.autoencoder",
        "transferlab.heads.vae",
        "transferlab.heads.caption",
        "transferlab.heads.bbox",
    ),
)
TASKS: Registry[Callable[..., object]] = Registry(
    "task",
    entry_point_group="transferlab.tasks",
    builtin_modules=(
        "transferlab.tasks.digits",
        "transferlab.tasks.shapes",
        "transferlab.tasks.folders",
        "transferlab.tasks.mask_folders",
        "transferlab.tasks.text",
        "transferlab.tasks.audio",
        "transferlab.tasks.caption_csv",
        "transferlab.tasks.box_files",
    ),
)

WEIGHTINGS: Registry[Callable[..., object]] = Registry(
    "weighting",
    entry_point_group="transferlab.weightings",
    builtin_modules=("transferlab.engine.weightings",),
)

REGISTRIES: dict[str, Registry[Callable[..., object]]] = {
    "backbone": BACKBONES,
    "head": HEADS,
    "task": TASKS,
    "weighting": WEIGHTINGS,
}
