"""YAML written by users (ablation files, ``--set`` values), read as plain data within limits.

``yaml.safe_load`` constructs no objects, but it still expands aliases (ten lines of
anchors can stand for a billion nodes, and anything that walks or prints the result
hangs), recurses once per level of nesting, keeps the last of two equal keys, and lets
ValueErrors out for an integer of 5,000 digits. Here every such input is a one-line
ConfigError that names the file and the line, raised before anything is built from it.
"""

from __future__ import annotations

import re
import reprlib
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from alexnet.errors import ConfigError

# An ablation file is about 1 KB, 100 nodes and 5 levels deep; these are far above any
# real one and far below what takes seconds to read (pure-Python PyYAML reads well under
# 1 MB/s on a laptop core).
MAX_BYTES = 64 * 1024
MAX_NODES = 10_000  # counted expanded: every alias counts as a copy of what it names
MAX_DEPTH = 16
MAX_KEY_CHARS = 100

_MERGE_TAG = "tag:yaml.org,2002:merge"

_brief = reprlib.Repr()
_brief.maxstring = _brief.maxother = 60
_brief.maxlist = _brief.maxtuple = _brief.maxset = 6
_brief.maxdict = 4
_brief.maxlevel = 3


def brief(value: Any) -> str:
    """A value as a short one-line repr: an error message never echoes a whole input."""
    return _brief.repr(value)


class SyntaxProblem(ConfigError):
    """Text that is not YAML at all (``--set`` then reads the value as a plain string)."""


class _Loader(yaml.SafeLoader):
    def __init__(self, text: str, name: str) -> None:
        super().__init__(text)
        self.name = name  # marks, and so every message, name the file
        self._depth = 0
        # Per composed node, the size and depth it has once its aliases are expanded.
        self._expanded: dict[int, tuple[int, int]] = {}
        self._one_line = "\n" not in text.strip()  # a --set value: no line number to give

    def _refuse(self, mark: yaml.Mark | None, problem: str) -> ConfigError:
        line = f":{mark.line + 1}" if mark is not None and not self._one_line else ""
        return ConfigError(f"{self.name}{line}: {problem}")

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._expanded:
                raise self._refuse(event.start_mark, f"alias *{event.anchor} refers to the "
                                   "node that contains it; write the value out instead")
            return super().compose_node(parent, index)
        if getattr(event, "tag", None) is not None:
            tag = event.tag.replace("tag:yaml.org,2002:", "!!")
            raise self._refuse(event.start_mark, f"tag {brief(tag)} is not allowed; "
                               "write plain values (text, numbers, true/false, lists, mappings)")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise self._refuse(event.start_mark, f"nested more than {MAX_DEPTH} levels deep")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._count(node)
        return node

    def _count(self, node: Node) -> None:
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        sizes = [self._expanded[id(c)] for c in children]
        size = 1 + sum(s for s, _ in sizes)
        depth = 1 + max((d for _, d in sizes), default=0)
        if size > MAX_NODES:
            raise self._refuse(node.start_mark, f"holds more than {MAX_NODES:,} values, "
                               "counting each alias (*name) as a copy of what it names")
        if depth > MAX_DEPTH:
            raise self._refuse(node.start_mark, f"nested more than {MAX_DEPTH} levels deep "
                               "once its aliases are expanded")
        self._expanded[id(node)] = (size, depth)

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as err:  # an int of 5000 digits
            kind = {"int": "an integer", "float": "a number"}.get(
                str(node.tag).rsplit(":", 1)[-1], str(node.tag))
            reason = str(err).split(":")[0]
            raise self._refuse(node.start_mark, f"cannot read {brief(node.value)} as "
                               f"{kind} ({reason}); quote it to keep it as text") from None


def _construct_mapping(loader: _Loader, node: MappingNode, deep: bool = False) -> dict:
    """PyYAML keeps the last of two equal keys silently; a duplicate arm must be an error."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:  # `<<: *shared` merges; explicit keys override it
            continue
        line = key_node.start_mark.line
        if not isinstance(key_node, ScalarNode):
            raise loader._refuse(key_node.start_mark, "a key is a list or mapping; keys are "
                                 "plain names")
        if len(key_node.value) > MAX_KEY_CHARS or not key_node.value.isprintable():
            raise loader._refuse(key_node.start_mark, f"key {brief(key_node.value)} is not a "
                                 f"name of at most {MAX_KEY_CHARS} printable characters")
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise loader._refuse(key_node.start_mark, f"duplicate key {brief(key)} (first at "
                                 f"line {seen[key] + 1}); each arm and key may appear once")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# No config value is a date: 2024-01-01 stays the text it is (a folder name, say). And only
# true/false are booleans, as in YAML 1.2: PyYAML's YAML 1.1 also reads on/off/yes/no as
# booleans, which turned `--set runtime.amp=off` and an arm named `off:` into False.
_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if not tag.endswith(":timestamp")
            and tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def load_yaml(text: str, name: str) -> Any:
    """The plain data (dicts, lists, str, int, float, bool, None) in one YAML document.

    Every problem is a ConfigError of one line starting with ``name`` (and the line number
    where there is one); text that does not parse raises its subclass SyntaxProblem.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise ConfigError(f"{name}: {size:,} bytes of YAML; the limit is {MAX_BYTES:,} "
                          "(an ablation file is about 1 KB)")
    loader = None
    try:
        loader = _Loader(text, name)  # checks the characters first
        return loader.get_single_data()
    except yaml.reader.ReaderError as err:
        code = ord(err.character) if isinstance(err.character, str) else err.character
        raise ConfigError(f"{name}: character #x{code:04x} at position {err.position} cannot "
                          "appear in YAML text; is this a text file?") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark and "\n" in text.strip() else ""
        problem = " ".join(str(err.problem or err.context or "").split())
        raise SyntaxProblem(f"{name}{line}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as err:
        raise SyntaxProblem(f"{name}: YAML syntax error: {' '.join(str(err).split())}"
                            ) from None
    finally:
        if loader is not None:
            loader.dispose()
