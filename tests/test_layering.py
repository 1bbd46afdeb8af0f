"""kimitune's packages depend one way: ops <- model <- quant <- adapters, and the recipes (data, infer, train, plan,
cli) above them. Every import counts, the lazy ones inside functions too: a cycle postponed is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kimitune"

# What each part may import besides itself (config is the YAML schema: a leaf, read only by the recipes).
ALLOWED = {
    "ops": set(),
    "model": {"ops"},
    "quant": {"ops", "model"},
    "adapters": {"ops", "model", "quant"},
    "config": set(),
    "config_keys": {"config"},  # the keys' listing, read off the schema (`kimitune config keys`)
    "triton_env": set(),  # environment defaults the root applies on import
    "data": {"config"},
    "infer": {"ops", "model", "quant", "adapters", "config", "data"},
    "train": {"ops", "model", "quant", "adapters", "config", "data", "infer"},
    "plan": {"ops", "model", "quant", "adapters", "config", "data", "train"},
    "cli": {"ops", "model", "quant", "adapters", "config", "config_keys", "data", "infer", "train", "plan"},
}


def part_of(module: str) -> str:
    """'kimitune.model.kda' -> 'model'; the package's own __init__ / __main__ are 'root'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] not in ("__init__", "__main__") else "root"


def imports() -> list[tuple[str, str, str]]:
    """(file, importing part, imported kimitune module) for every import in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kimitune"):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.startswith("kimitune")]
            else:
                continue
            found += [(str(path.relative_to(PACKAGE.parent)), part_of(module), target) for target in targets]
    return found


def test_every_part_is_known():
    parts = {part_of(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    assert parts - {"root"} <= ALLOWED.keys(), parts - ALLOWED.keys()


def test_dependencies_run_one_way():
    # The root (kimitune/__init__.py: the public API) gathers the layers, so only the recipes may import it.
    recipes = {"data", "infer", "train", "plan", "cli"}
    wrong = [f"{file}: {part} imports {target}" for file, part, target in imports()
             if part != "root" and part_of(target) != part and part_of(target) not in ALLOWED[part]
             and not (part_of(target) == "root" and part in recipes)]
    assert not wrong, "\n".join(wrong)


def test_the_allowed_graph_has_no_cycle():
    visiting, done = set(), set()

    def visit(part: str, path: tuple[str, ...]) -> None:
        assert part not in visiting, " -> ".join(path + (part,))
        if part in done:
            return
        visiting.add(part)
        for dependency in ALLOWED[part]:
            visit(dependency, path + (part,))
        visiting.discard(part)
        done.add(part)

    for part in ALLOWED:
        visit(part, ())
