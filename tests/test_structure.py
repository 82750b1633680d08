"""The package's structure: no import cycles, and the stage contract said once (issue 24).

Every ``import`` and ``from ... import`` of a katdata module inside katdata/ counts, lazy ones inside
functions too (a lazy import is still an arrow: it only hides the cycle until the function runs).
"""

import ast
import importlib
from pathlib import Path

import katdata

ROOT = Path(katdata.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("katdata"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    out.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.startswith("katdata")}
        graph[name] = {m for m in out if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_katdata():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_stage_is_declared_once_and_drives_the_pipeline():
    """The pipeline's order, optional stages and files, the recipe's sections and the stage commands all
    come from the declarations in katdata.stages."""
    from katdata import cli, pipeline
    from katdata.recipe import Recipe
    from katdata.run_folder import FILES
    from katdata.stages import STAGE_MODULES, all_stages

    stages = all_stages()
    assert [s.name for s in stages] == pipeline.STAGES and len(stages) == len(STAGE_MODULES)
    assert pipeline.OPTIONAL == {s.name for s in stages if s.optional}
    for s in stages:
        assert set(s.reads + s.may_read + s.writes) <= set(FILES), s.name
        if s.config is not None:
            assert Recipe.model_fields[s.name].description.startswith(s.help), s.name
        assert pipeline.STAGE_FILES[s.name] == s.files(s.writes)
    commands = {name for name, (module, _) in cli.DELEGATED.items() if module in STAGE_MODULES}
    assert commands == {s.name for s in stages}  # every stage is a command
    # a stage without its own main gets the command its declaration makes: a flag per scalar setting
    from katdata import stage_command

    for s in stages:
        module = importlib.import_module(STAGE_MODULES[[x.name for x in stages].index(s.name)])
        if hasattr(module, "main") or s.config is None:
            continue
        helptext = stage_command.build_parser(s).format_help()
        for name in stage_command.flag_settings(s):
            assert f"--{name.replace('_', '-')}" in helptext, (s.name, name)


def test_stage_sections_reach_the_fingerprint():
    """A setting a stage declares it depends on changes that stage's fingerprint: review.blocking for
    export, sandbox for the stages that run code."""
    from katdata import fingerprint
    from katdata.recipe import Recipe
    from katdata.stages import get

    a = Recipe.model_validate({"data": {"path": "q.jsonl"}})
    b = Recipe.model_validate({"data": {"path": "q.jsonl"}, "review": {"blocking": ["low_margin"]},
                               "sandbox": {"memory_mb": 2048}})
    for stage, key in (("export", "review.blocking"), ("solve", "sandbox.memory_mb"), ("sample", "sandbox.memory_mb")):
        diff = fingerprint.compare({"settings": fingerprint.stage_settings(a, get(stage))},
                                   {"settings": fingerprint.stage_settings(b, get(stage))})
        assert any(d.startswith(key) for d in diff), (stage, diff)
    tag = fingerprint.compare({"settings": fingerprint.stage_settings(a, get("tag"))},
                              {"settings": fingerprint.stage_settings(b, get("tag"))})
    assert tag == []
