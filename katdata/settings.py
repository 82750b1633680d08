"""Settings from YAML and the command line, for recipes and stage configs alike.

Read a YAML mapping (UTF-8, no duplicate keys), apply ``--set key.path=value`` overrides (YAML
scalars), and turn a pydantic validation error into one line that names where each bad key came
from (FILE:LINE or the ``--set`` argument), the key, and what is allowed (with a close-match hint
for a misspelt key). Nothing here knows what a recipe or a stage is.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from katdata.errors import InputError, KatdataError


def _unwrap(ann: Any) -> Any:
    """The section type inside Optional[...] / list[...] (dicts are kept: their keys are names)."""
    while get_origin(ann) is not None and get_origin(ann) is not dict and get_origin(ann) is not Literal:
        args = [a for a in get_args(ann) if a is not type(None)]
        inner = [a for a in args if (isinstance(a, type) and issubclass(a, BaseModel)) or get_origin(a) in (dict, list)]
        if not inner:
            return None
        ann = inner[0]
    return ann


def _section(model: Any, loc: tuple) -> Any:
    """The pydantic class of the section at ``loc`` (walking nested models, lists and dicts), else None."""
    for part in loc:
        if isinstance(part, int):
            continue
        if get_origin(model) is dict:  # engines.NAME: the key is a name, not a field
            model = _unwrap(get_args(model)[1])
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = _unwrap(model.model_fields[part].annotation)
    return model


def _bounds(model: Any, loc: tuple) -> str:
    """'>= 0 and < 1' for the number field at ``loc``, from its Field(ge=..., lt=...) constraints."""
    section = _section(model, loc[:-1])
    field = section.model_fields.get(loc[-1]) if isinstance(section, type) and issubclass(section, BaseModel) else None
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    out = [f"{words[k]} {getattr(m, k)}" for m in (field.metadata if field else []) for k in words if hasattr(m, k)]
    return " and ".join(out)


def _key_lines(path: Path) -> dict[tuple, int]:
    """Line number of every key and list item in a YAML file, by its path of keys."""
    out: dict[tuple, int] = {}

    def walk(node, prefix: tuple) -> None:
        items = ([(k.value, k, v) for k, v in node.value] if isinstance(node, yaml.MappingNode)
                 else [(i, v, v) for i, v in enumerate(node.value)] if isinstance(node, yaml.SequenceNode) else [])
        for key, mark_node, value in items:
            out[prefix + (key,)] = mark_node.start_mark.line + 1
            walk(value, prefix + (key,))

    try:
        walk(yaml.compose(path.read_text("utf-8"), Loader=yaml.SafeLoader), ())
    except (OSError, UnicodeError, yaml.YAMLError):
        pass
    return out


class Blame:
    """Names where a recipe key came from: the ``--set`` argument that set it, else FILE:LINE."""

    def __init__(self, path: Optional[Path], sets: dict[str, str], prefix: tuple = ()):
        self.path, self.sets, self.prefix, self._lines = path, sets, prefix, None

    def __call__(self, loc: tuple) -> str:
        dotted = ".".join(str(p) for p in loc)
        if not dotted:  # a check across sections
            return " with ".join([str(self.path or "recipe")] + [f"--set '{item}'" for item in self.sets.values()])
        for key, item in self.sets.items():
            if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
                return f"--set '{item}'"
        if self.path is None:
            return "settings"
        if self._lines is None:
            self._lines = _key_lines(self.path)
        loc = self.prefix + tuple(loc)
        for n in range(len(loc), 0, -1):
            if tuple(loc[:n]) in self._lines:
                return f"{self.path}:{self._lines[tuple(loc[:n])]}"
        return str(self.path)


def explain(exc: ValidationError, blame, model: Any, style: str = "key") -> KatdataError:
    """A pydantic error as one line: per problem where (``blame(loc)``, a fixed text or None), which key, what is allowed.

    ``style="option"`` names keys as command-line options (``test_size`` -> ``--test-size``).
    """
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        name = ".".join(str(p) for p in loc) or "(top)"
        if style == "option":
            name = "--" + name.replace("_", "-")
        where = blame(loc) if callable(blame) else blame
        where = f"{where}: " if where else ""
        if err["type"] == "extra_forbidden":
            section = _section(model, loc[:-1])
            valid = list(section.model_fields) if isinstance(section, type) and issubclass(section, BaseModel) else []
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean '{'.'.join(str(p) for p in loc[:-1] + (near[0],))}'?" if near else ""
            lines.append(f"{where}unknown key '{name}'{hint}")
        elif err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and loc:
            lines.append(f"{where}{name}: {err['input']!r} is out of range (allowed: {_bounds(model, loc) or err['msg']})")
        else:
            got = "" if err["type"] == "missing" or isinstance(err.get("input"), dict) else f" (got {err.get('input')!r})"
            lines.append(f"{where}{name}: {err['msg'].removeprefix('Value error, ')}{got}")
    return KatdataError("; ".join(lines))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: SafeLoader reports it
            break
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first on line {first})", key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _yaml_problem(exc: yaml.YAMLError) -> tuple[str, Optional[int]]:
    mark = getattr(exc, "problem_mark", None)
    text = " ".join(p for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p) or str(exc)
    return " ".join(text.split()), (mark.line + 1 if mark else None)


def read_yaml(path: str | Path, what: str = "recipe") -> dict:
    """A YAML mapping from a UTF-8 file; duplicate keys, empty files and non-mappings are errors."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, f"a folder, not a {what} file")
    if not path.is_file():
        raise InputError(path, f"{what} not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot read the {what} ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(path, f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the {what} as UTF-8",
                         line=line) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        problem, line = _yaml_problem(exc)
        raise InputError(path, f"not valid YAML: {problem}", line=line) from None
    if data is None:
        raise InputError(path, f"the {what} is empty")
    if not isinstance(data, dict):
        raise InputError(path, f"a {what} is a YAML mapping (key: value lines), not a {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``KEY.PATH=VALUE`` -> (key path, value parsed as YAML); errors name the argument."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.strip() for part in key.split(".")):
        raise KatdataError(f"--set '{item}': expected KEY.PATH=VALUE, e.g. --set sample.n=4")
    if not raw.strip():
        return key, None
    try:
        return key, yaml.load(raw, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise KatdataError(f"--set '{item}': the value is not valid YAML ({_yaml_problem(exc)[0]})") from None


def set_key(data: dict, dotted: str, value: Any, item: Optional[str] = None) -> None:
    """Apply one ``--set key.path=value`` override (``value`` already parsed)."""
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if node is None:
            node = data[key] = {}
        if not isinstance(node, dict):
            raise KatdataError(f"--set '{item or dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def describe(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """(key path, help text) for every field, for docs and `katdata ls`."""
    out = []
    for name, field in model.model_fields.items():
        key = prefix + name
        out.append((key, field.description or ""))
        ann: Any = field.annotation
        sub = [a for a in (get_args(ann) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if sub:
            out.extend(describe(sub[0], key + "."))
    return out


def no_output_key(data: Any, stage: str) -> Any:
    """A section's ``output`` key, removed (the stage writes RUN/STAGE, katdata.run_folder.FILES): named in one
    line rather than as an unknown key (pydantic's ``mode="before"`` validator of the train, rl and eval sections)."""
    if isinstance(data, dict) and "output" in data:
        raise ValueError(f"'output' was removed: the {stage} stage always writes RUN_DIR/{stage}/ (to keep an "
                         "earlier one, copy the run folder); delete the key")
    return data


def recipe_section(path: Optional[str | Path], section: str, model: type[BaseModel]) -> BaseModel:
    """Section ``section`` of the YAML file ``path`` as ``model``; its defaults when the file (None) or the section
    is absent. A bad key is one line naming the file, its line and the key."""
    from pydantic import create_model

    data = dict(read_yaml(path).get(section) or {}) if path else {}
    holder = create_model("Recipe", **{section: (model, ...)})  # errors then name the key from the section on
    try:
        return getattr(holder.model_validate({section: data}), section)
    except ValidationError as exc:
        raise explain(exc, Blame(Path(path) if path else None, {}), holder) from None
