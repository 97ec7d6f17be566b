"""Registries: registration, lookup messages, entry-point discovery (faked as pluggy's tests do), the
real registries, ``transferlab plugins list``, and a CLI that starts without torch or ray."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from transferlab import registry as registry_module
from transferlab.cli.main import cli
from transferlab.registry import (
    BACKBONES,
    BUILTIN_SOURCE,
    HEADS,
    REGISTRIES,
    TASKS,
    Registry,
    RegistryError,
    UnknownPluginError,
)

GROUP = "transferlab.test_widgets"
PLUGIN_MODULE = "acme_widgets_for_tests"
PLUGIN_SOURCE = textwrap.dedent(
    '''
    """Plugins of a made-up distribution, imported through fake entry points."""


    def sprocket(*, teeth: int = 12):
        """A sprocket with teeth.

        The rest of this docstring is not part of the description.
        """
        return ("sprocket", teeth)


    def gear():
        """A gear."""
        return "gear"
    '''
)


@dataclass(frozen=True)
class FakeDistribution:
    name: str


class FakeEntryPoint:
    """What the registry reads from an ``importlib.metadata.EntryPoint``, with a distribution."""

    def __init__(self, name: str, value: str, dist: str, group: str = GROUP) -> None:
        self.name, self.value, self.group = name, value, group
        self.dist = FakeDistribution(dist)

    def load(self) -> object:
        return EntryPoint(self.name, self.value, self.group).load()


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module on ``sys.path`` that the fake entry points point at."""
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield PLUGIN_MODULE
    sys.modules.pop(PLUGIN_MODULE, None)


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Make ``entry_points(group=...)`` return the given entry points for their group, nothing else."""

    def install(*eps: FakeEntryPoint) -> None:
        monkeypatch.setattr(
            registry_module, "entry_points", lambda *, group: [ep for ep in eps if ep.group == group]
        )

    return install


def widgets() -> Registry:
    return Registry("widget", entry_point_group=GROUP)


def good_and_broken(plugin_module: str) -> tuple[FakeEntryPoint, ...]:
    return (
        FakeEntryPoint("sprocket", f"{plugin_module}:sprocket", "acme-widgets"),
        FakeEntryPoint("cog", "acme_missing_module_for_tests:cog", "acme-broken"),
        FakeEntryPoint("gear", f"{plugin_module}:gear", "acme-widgets"),
    )


# -- Registry semantics ------------------------------------------------------------------------------
def test_register_and_get(fake_entry_points: Callable[..., None]) -> None:
    fake_entry_points()
    reg = widgets()

    @reg.register("knob")
    def make_knob(*, size: int = 1) -> tuple[str, int]:
        """A knob to turn.

        Details that stay out of the one-line description.
        """
        return ("knob", size)

    @reg.register()
    def lever() -> str:
        return "lever"

    reg.add("dial", lambda: "dial", source="acme", description="A dial, described explicitly.")

    assert reg.get("knob") is make_knob
    assert reg.get("knob")(size=3) == ("knob", 3)
    assert reg.get("lever")() == "lever"
    assert reg.names() == ["dial", "knob", "lever"]
    assert list(reg) == ["dial", "knob", "lever"]
    assert "knob" in reg and "handle" not in reg
    knob = reg.entry("knob")
    assert (knob.name, knob.kind, knob.source, knob.description) == (
        "knob",
        "widget",
        BUILTIN_SOURCE,
        "A knob to turn.",
    )
    assert reg.entry("lever").description == ""  # no docstring, no description
    assert reg.entry("dial").source == "acme"
    assert reg.entry("dial").description == "A dial, described explicitly."
    assert [e.name for e in reg.entries()] == ["dial", "knob", "lever"]
    reg.remove("dial")
    assert "dial" not in reg


def test_duplicate_name_names_both_sources(fake_entry_points: Callable[..., None]) -> None:
    fake_entry_points()
    reg = widgets()
    reg.add("knob", lambda: 1, source="acme-knobs")
    with pytest.raises(RegistryError) as info:
        reg.add("knob", lambda: 2, source="other-knobs")
    assert str(info.value) == (
        "widget 'knob' is registered twice: by 'acme-knobs' and by 'other-knobs'; rename one of them"
    )
    assert reg.get("knob")() == 1  # the first registration is kept, never silently overwritten


def test_unknown_name_suggests_close_matches(fake_entry_points: Callable[..., None]) -> None:
    fake_entry_points()
    reg = widgets()
    for name in ("knob", "knot", "lever"):
        reg.add(name, lambda: None, source="acme")
    with pytest.raises(UnknownPluginError) as info:
        reg.get("knobb")
    message = str(info.value)
    assert message.startswith("widget 'knobb' is not registered; did you mean 'knob' or 'knot'?")
    assert "`transferlab plugins list --kind widget`" in message
    assert isinstance(info.value, KeyError)  # callers may catch it as a KeyError

    with pytest.raises(UnknownPluginError) as info:
        reg.get("zzzzzz")
    assert "did you mean" not in str(info.value)
    assert "`transferlab plugins list --kind widget`" in str(info.value)


# -- entry points -------------------------------------------------------------------------------------
def test_entry_point_plugin_is_registered_with_its_distribution(
    plugin_module: str, fake_entry_points: Callable[..., None]
) -> None:
    fake_entry_points(FakeEntryPoint("sprocket", f"{plugin_module}:sprocket", "acme-widgets"))
    reg = widgets()
    assert reg.get("sprocket")(teeth=20) == ("sprocket", 20)
    entry = reg.entry("sprocket")
    assert (entry.source, entry.kind, entry.description) == (
        "acme-widgets",
        "widget",
        "A sprocket with teeth.",
    )
    assert reg.failures() == []


def test_entry_points_of_other_groups_are_ignored(
    plugin_module: str, fake_entry_points: Callable[..., None]
) -> None:
    fake_entry_points(
        FakeEntryPoint("gear", f"{plugin_module}:gear", "acme-widgets", group="transferlab.other_group")
    )
    assert widgets().names() == []


def test_real_entry_point_object_without_distribution(
    plugin_module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ep = EntryPoint("gear", f"{plugin_module}:gear", GROUP)
    monkeypatch.setattr(registry_module, "entry_points", lambda *, group: [ep] if group == GROUP else [])
    reg = widgets()
    assert reg.get("gear")() == "gear"
    assert reg.entry("gear").source == "<unknown distribution>"


def test_broken_plugin_is_reported_and_nothing_else_breaks(
    plugin_module: str, fake_entry_points: Callable[..., None]
) -> None:
    fake_entry_points(*good_and_broken(plugin_module))
    reg = widgets()
    assert reg.names() == ["gear", "sprocket"]  # loaded before and after the broken one
    assert reg.get("gear")() == "gear"
    [failure] = reg.failures()
    assert (failure.name, failure.kind, failure.source, failure.target) == (
        "cog",
        "widget",
        "acme-broken",
        "acme_missing_module_for_tests:cog",
    )
    assert failure.error == "ModuleNotFoundError: No module named 'acme_missing_module_for_tests'"
    with pytest.raises(UnknownPluginError) as info:
        reg.get("cog")
    assert "widget 'cog' is not registered" in str(info.value)
    assert "plugin 'cog' failed to import; see `transferlab plugins list`" in str(info.value)


def test_plugin_whose_import_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_entry_points: Callable[..., None]
) -> None:
    (tmp_path / "acme_exploding_for_tests.py").write_text("raise RuntimeError('no GPU driver found')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fake_entry_points(FakeEntryPoint("boom", "acme_exploding_for_tests:boom", "acme-boom"))
    reg = widgets()
    assert reg.names() == []
    assert [f.error for f in reg.failures()] == ["RuntimeError: no GPU driver found"]
    sys.modules.pop("acme_exploding_for_tests", None)


def test_entry_point_clashing_with_builtin_names_both(
    plugin_module: str, fake_entry_points: Callable[..., None]
) -> None:
    fake_entry_points(FakeEntryPoint("gear", f"{plugin_module}:gear", "acme-widgets"))
    reg = widgets()

    @reg.register("gear")
    def builtin_gear() -> str:
        """The built-in gear."""
        return "builtin"

    expected = "widget 'gear' is registered twice: by 'transferlab' and by 'acme-widgets'; rename one of them"
    with pytest.raises(RegistryError) as info:
        reg.names()
    assert str(info.value) == expected
    # Every later lookup reports the same clash (no half-loaded registry, no misleading message).
    with pytest.raises(RegistryError) as again:
        reg.get("gear")
    assert str(again.value) == expected


def test_a_plugin_that_also_uses_the_decorator_is_one_plugin(
    plugin_module: str, fake_entry_points: Callable[..., None]
) -> None:
    import importlib

    fake_entry_points(FakeEntryPoint("gear", f"{plugin_module}:gear", "acme-widgets"))
    reg = widgets()
    gear = importlib.import_module(plugin_module).gear
    reg.register("gear")(gear)  # what `@REGISTRY.register` inside the plugin's module does
    assert reg.entry("gear").source == "acme-widgets" and reg.get("gear") is gear


def test_plugin_options_may_be_positional_or_keyword() -> None:
    from transferlab.engine.assembly import check_options

    def tinyvgg(in_channels=3, width=16):  # noqa: ANN001, ANN202 - a plugin author's plain signature
        """A plugin without keyword-only markers."""

    check_options("backbone", "tinyvgg", tinyvgg, {"width": 8})
    with pytest.raises(ValueError, match="has no option 'depth'; its options are: in_channels, width"):
        check_options("backbone", "tinyvgg", tinyvgg, {"depth": 8})

    def head(feature_info, target, hidden=8):  # noqa: ANN001, ANN202
        """Heads get (feature_info, target) positionally; those are not options."""

    with pytest.raises(ValueError, match="its options are: hidden$"):
        check_options("head", "mlp", head, {"target": 1})


def test_registry_loads_entry_points_once(plugin_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    ep = FakeEntryPoint("gear", f"{plugin_module}:gear", "acme-widgets")

    def entry_points(*, group: str) -> list[FakeEntryPoint]:
        calls.append(group)
        return [ep]

    monkeypatch.setattr(registry_module, "entry_points", entry_points)
    reg = widgets()
    assert calls == []  # lazy: nothing happens at construction
    for _ in range(3):
        assert reg.names() == ["gear"]
    assert calls == [GROUP]


# -- the real registries -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("registry", "kind", "builtins"),
    [
        (BACKBONES, "backbone", {"lenet5", "convnet", "timm"}),
        (HEADS, "head", {"classify"}),
        (TASKS, "task", {"digits", "shapes"}),
    ],
)
def test_real_registries_hold_the_builtins(registry: Registry, kind: str, builtins: set[str]) -> None:
    assert registry.kind == kind
    assert REGISTRIES[kind] is registry
    assert builtins <= set(registry.names())
    for name in builtins:
        entry = registry.entry(name)
        assert entry.source == BUILTIN_SOURCE
        assert entry.description and "\n" not in entry.description
        assert callable(entry.factory)


# -- transferlab plugins list ----------------------------------------------------------------------
@pytest.fixture
def fake_backbones(
    plugin_module: str, fake_entry_points: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> Registry:
    """A fresh backbone registry with one built-in, two good plugins and one that fails to import."""
    fake_entry_points(
        *(
            FakeEntryPoint(ep.name, ep.value, ep.dist.name, group="acme.backbones")
            for ep in good_and_broken(plugin_module)
        )
    )
    reg = Registry("backbone", entry_point_group="acme.backbones")

    @reg.register("tinynet")
    def tinynet() -> None:
        """A tiny built-in net."""

    monkeypatch.setitem(REGISTRIES, "backbone", reg)
    return reg


def invoke(*args: str) -> click.testing.Result:
    # A wide terminal so rich does not wrap table cells.
    return CliRunner(env={"COLUMNS": "250"}).invoke(cli, list(args))


def test_plugins_list_json(fake_backbones: Registry) -> None:
    result = invoke("plugins", "list", "--output", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rows = {(r["kind"], r["name"]): r for r in data["plugins"]}
    assert rows[("backbone", "tinynet")] == {
        "name": "tinynet",
        "kind": "backbone",
        "source": "transferlab",
        "description": "A tiny built-in net.",
    }
    assert rows[("backbone", "sprocket")]["source"] == "acme-widgets"
    assert rows[("backbone", "sprocket")]["description"] == "A sprocket with teeth."
    assert rows[("backbone", "gear")]["source"] == "acme-widgets"
    assert ("backbone", "cog") not in rows
    assert rows[("head", "classify")]["source"] == "transferlab"
    assert {("task", "digits"), ("task", "shapes")} <= set(rows)
    assert data["failed"] == [
        {
            "name": "cog",
            "kind": "backbone",
            "source": "acme-broken",
            "target": "acme_missing_module_for_tests:cog",
            "error": "ModuleNotFoundError: No module named 'acme_missing_module_for_tests'",
        }
    ]


def test_plugins_list_table(fake_backbones: Registry) -> None:
    result = invoke("plugins", "list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if "name" in line and "source" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["name", "kind", "source", "description"]

    def row(name: str) -> list[str]:
        line = next(line for line in lines if line.startswith(f"│ {name} "))
        return [c.strip() for c in line.strip("│ ").split("│")]

    assert row("tinynet") == ["tinynet", "backbone", "transferlab", "A tiny built-in net."]
    assert row("sprocket") == ["sprocket", "backbone", "acme-widgets", "A sprocket with teeth."]
    assert row("classify")[:3] == ["classify", "head", "transferlab"]
    assert row("digits")[:3] == ["digits", "task", "transferlab"]
    assert not any(line.startswith("│ cog ") for line in lines)
    assert (
        "failed to load backbone 'cog' from acme-broken (acme_missing_module_for_tests:cog): "
        "ModuleNotFoundError: No module named 'acme_missing_module_for_tests'"
    ) in result.output


def test_plugins_list_one_kind(fake_backbones: Registry) -> None:
    result = invoke("plugins", "list", "--kind", "head", "--output", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {r["kind"] for r in data["plugins"]} == {"head"}
    assert "classify" in {r["name"] for r in data["plugins"]}
    assert data["failed"] == []  # the broken backbone belongs to another kind

    table = invoke("plugins", "list", "--kind", "head")
    assert table.exit_code == 0, table.output
    assert "│ classify " in table.output
    assert "tinynet" not in table.output and "digits" not in table.output and "cog" not in table.output


def test_plugins_list_rejects_unknown_kind() -> None:
    result = invoke("plugins", "list", "--kind", "widget")
    assert result.exit_code == 2
    assert "'widget' is not one of 'backbone', 'head', 'task'" in result.output


def test_plugins_list_reports_a_clash_as_an_error(
    plugin_module: str, fake_entry_points: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_entry_points(FakeEntryPoint("convnet", f"{plugin_module}:gear", "acme-widgets", group="acme.bb"))
    reg = Registry("backbone", entry_point_group="acme.bb")
    reg.add("convnet", lambda: None, source=BUILTIN_SOURCE)
    monkeypatch.setitem(REGISTRIES, "backbone", reg)
    result = invoke("plugins", "list")
    assert result.exit_code == 1
    assert (
        "Error: backbone 'convnet' is registered twice: by 'transferlab' and by 'acme-widgets'"
        in result.output
    )


# -- the CLI starts fast ---------------------------------------------------------------------------------
def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            paths += command_paths(command, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


@pytest.mark.parametrize("path", command_paths(cli), ids=lambda p: " ".join(p) or "transferlab")
def test_help_exits_zero(path: tuple[str, ...]) -> None:
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: {' '.join(('cli', *path))} ")
    assert "--help" in result.output


def test_every_documented_command_is_registered() -> None:
    assert {"validate", "submit", "demo", "status", "results", "plot", "query", "plugins"} <= set(
        cli.commands
    )


def test_cli_import_and_help_do_not_import_torch_or_ray() -> None:
    code = textwrap.dedent(
        """
        import sys
        from transferlab.cli.main import cli
        for args in (["--help"], ["validate", "--help"], ["plugins", "list", "--help"]):
            try:
                cli.main(args, prog_name="transferlab")
            except SystemExit as exc:
                assert exc.code == 0, (args, exc.code)
        print(sorted(m for m in ("torch", "ray", "timm") if m in sys.modules))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
