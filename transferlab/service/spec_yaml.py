"""Strict YAML reading for specs: safe types only, duplicate keys refused, size and alias limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_SPEC_BYTES = 1_000_000
MAX_ALIASES = 100
MAX_ALIAS_NODES = 10_000  # nodes that aliases may add once expanded (billion laughs)


class SpecError(ValueError):
    """A spec is invalid; ``problems`` are (field path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = []
        for loc, msg in self.problems:
            where = f"{self.source}: {loc}: " if loc else f"{self.source}: "
            lines.append(where + msg)
        return "\n".join(lines)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, recursive aliases and alias bombs.

    Aliases share one node, so a "billion laughs" document parses quickly; the cost comes later, when
    the data is validated or printed. We count the nodes every alias would add once expanded.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._alias_nodes = 0
        self._open_anchors: list[str | None] = []
        self._node_sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D102
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases; refusing a possible alias bomb")
            if event.anchor in self._open_anchors:
                raise yaml.composer.ComposerError(
                    None, None, f"recursive alias *{event.anchor} inside its own anchor", event.start_mark
                )
            node = super().compose_node(parent, index)
            self._alias_nodes += self._expanded_size(node)
            if self._alias_nodes > MAX_ALIAS_NODES:
                raise yaml.YAMLError(
                    f"aliases expand to more than {MAX_ALIAS_NODES} values; refusing a possible alias bomb"
                )
            return node
        anchor = getattr(self.peek_event(), "anchor", None)
        self._open_anchors.append(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._open_anchors.pop()

    def _expanded_size(self, node: yaml.Node) -> int:
        """Values in ``node`` with every alias expanded (memoised: aliases share nodes)."""
        size = self._node_sizes.get(id(node))
        if size is None:
            children: list[yaml.Node] = []
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            size = 1 + sum(self._expanded_size(child) for child in children)
            self._node_sizes[id(node)] = size
        return size

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:  # noqa: D102
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"unhashable key {key!r}", key_node.start_mark
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_spec_text(path: str | Path) -> str:
    """The text of a spec file, with clear errors for missing, huge or binary files."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise SpecError(source, [("", "file not found")])
    if not path.is_file():
        raise SpecError(source, [("", "not a regular file")])
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise SpecError(source, [("", f"file is {size} bytes; a spec must be under {MAX_SPEC_BYTES} bytes")])
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise SpecError(source, [("", "binary file (contains NUL bytes); a spec is a YAML text file")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(source, [("", f"not UTF-8 text: {exc}")]) from None


def parse_spec_yaml(text: str, source: str = "<spec>") -> dict[str, Any]:
    """Parse spec text into a mapping; only plain YAML types are constructed."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader derives from SafeLoader
    except yaml.YAMLError as exc:
        raise SpecError(source, [("", f"invalid YAML: {exc}")]) from None
    if data is None:
        raise SpecError(source, [("", "the spec is empty")])
    if not isinstance(data, dict):
        raise SpecError(
            source, [("", f"a spec must be a mapping of keys to values, got a {type(data).__name__}")]
        )
    return data
