"""The GLIP modelling code as flat modules for a model folder, so ``trust_remote_code=True`` loads it anywhere.

transformers' remote-code loader copies the modules named in ``config.auto_map`` and, recursively, every module
they import as ``from .name import ...``, resolving ``.name`` to the file ``name.py`` beside them: packages and
``..`` imports are not followed. So the modules are written flat: ``configuration_glip.py`` and ``modeling_glip.py``
whole (every class ``auto_map`` names lives there), and each module they import relatively (``glip_hf.masking``,
a package) as one file holding only the definitions used (``masking.py``). That keeps out code with other
requirements, such as the mask picture's matplotlib, which the loader would otherwise ask users to install.
Everything is read from the installed sources when a folder is prepared, so the folder follows the library.
"""

from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "glip_hf"
PACKAGE_DIR = Path(__file__).resolve().parent.parent
ENTRY_MODULES = ("configuration_glip", "modeling_glip")  # copied whole: the auto_map classes live here
AUTO_MAP = {
    "AutoConfig": "configuration_glip.GLIPConfig",
    "AutoModel": "modeling_glip.GLIPModel",
    "AutoModelForZeroShotImageClassification": "modeling_glip.GLIPModel",
}
_RELATIVE_FROM = re.compile(r"from\s+\.+[\w.]*\s+import")
_BLOCKS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@dataclass
class _Module:
    """One module of the package: its parsed source and the names other modules need from it (None: all)."""

    name: str  # dotted, relative to the package: "masking", "configuration_glip"
    path: Path
    source: str
    tree: ast.Module
    needed: set[str] | None = field(default_factory=set)

    @property
    def flat_name(self) -> str:
        return self.name.replace(".", "_")

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


def _load(name: str) -> _Module:
    base = PACKAGE_DIR.joinpath(*name.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    source = path.read_text(encoding="utf-8")
    return _Module(name, path, source, ast.parse(source, filename=str(path)))


def _resolve(module: _Module, node: ast.ImportFrom) -> str:
    """The dotted name (relative to the package) that a relative ``from ... import`` in ``module`` refers to."""
    parts = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    if node.level - 1 > len(parts):
        raise ValueError(f"{module.path}: relative import beyond the {PACKAGE} package.")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _defined_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return {n.id for target in targets if target is not None for n in ast.walk(target) if isinstance(n, ast.Name)}


def _used_names(node: ast.stmt) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _is_preamble(node: ast.stmt, index: int) -> bool:
    """The module docstring and ``from __future__`` imports, kept in every module."""
    docstring = index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    return docstring or (isinstance(node, ast.ImportFrom) and node.module == "__future__")


def _kept_statements(module: _Module) -> list[ast.stmt]:
    """The top-level statements defining ``module.needed`` and, transitively, what those use (all if None)."""
    body = module.tree.body
    if module.needed is None:
        return list(body)
    wanted, kept = set(module.needed), set()
    changed = True
    while changed:
        changed = False
        for i, node in enumerate(body):
            if i not in kept and (_is_preamble(node, i) or _defined_names(node) & wanted):
                kept.add(i)
                wanted |= _used_names(node)
                changed = True
    missing = module.needed - set().union(*(_defined_names(body[i]) for i in kept))
    if missing:
        raise ValueError(f"{module.path} does not define {sorted(missing)} at the top level.")
    return [body[i] for i in sorted(kept)]


def _relative_imports(nodes: list[ast.stmt]) -> list[ast.ImportFrom]:
    return [n for node in nodes for n in ast.walk(node) if isinstance(n, ast.ImportFrom) and n.level > 0]


def _collect() -> dict[str, tuple[_Module, list[ast.stmt]]]:
    """Every module the entry modules need, each with the statements kept, iterated until nothing new is needed."""
    modules = {name: _load(name) for name in ENTRY_MODULES}
    for module in modules.values():
        module.needed = None
    while True:
        kept = {name: _kept_statements(module) for name, module in modules.items()}
        grew = False
        for name, module in list(modules.items()):
            for node in _relative_imports(kept[name]):
                if node.module is None:
                    raise ValueError(f"{module.path}: `from . import ...` cannot be written as a flat module.")
                target_name = _resolve(module, node)
                if target_name not in modules:
                    modules[target_name] = _load(target_name)
                target = modules[target_name]
                names = {alias.name for alias in node.names}
                if target.needed is not None and not names <= target.needed:
                    target.needed |= names
                    grew = True
        if not grew:
            return {name: (modules[name], kept[name]) for name in modules}


def _render(module: _Module, statements: list[ast.stmt], flat_names: dict[str, str]) -> str:
    """The kept statements' source lines, relative imports rewritten to the flat module names (no header)."""
    lines = module.source.splitlines()
    for node in _relative_imports(statements):
        row = node.lineno - 1
        lines[row] = _RELATIVE_FROM.sub(f"from .{flat_names[_resolve(module, node)]} import", lines[row], count=1)
    if module.needed is None:  # copied whole: comments between statements included
        return "\n".join(lines) + "\n"
    text, previous = "", None
    for node in statements:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        while start > 1 and lines[start - 2].lstrip().startswith("#"):  # the comment block right above it
            start -= 1
        if previous is not None and start > previous.end_lineno + 1:  # statements apart in the source stay apart
            text += "\n\n" if isinstance(node, _BLOCKS) or isinstance(previous, _BLOCKS) else "\n"
        text += "\n".join(lines[start - 1 : node.end_lineno]) + "\n"
        previous = node
    return text


def _header(module: _Module, code_hash: str) -> str:
    """The first line of a generated file. transformers keys a remote module by its own file's hash and registers the
    model class under the config class, so every file carries the hash of all of them: a folder whose modelling code
    differs never reuses another's cached ``configuration_glip``."""
    from .. import __version__

    relative = module.path.relative_to(PACKAGE_DIR.parent).as_posix()
    scope = "" if module.needed is None else ": only what the model uses"
    return f"# Generated by glip_hf.hub {__version__} (code {code_hash}) from {relative}{scope}.\n"


def write_remote_code(folder: str | Path) -> list[Path]:
    """Write the GLIP modelling code into ``folder`` as flat modules (see the module docstring).

    Returns:
        The files written, entry modules first.
    """
    from .. import __version__

    folder = Path(folder)
    collected = _collect()
    flat_names = {name: module.flat_name for name, (module, _) in collected.items()}
    bodies = {name: _render(module, statements, flat_names) for name, (module, statements) in collected.items()}
    digest = hashlib.sha256(__version__.encode())
    for name in sorted(bodies):
        digest.update(f"\0{flat_names[name]}\0{bodies[name]}".encode())
    written = []
    for name, (module, _) in collected.items():
        path = folder / f"{flat_names[name]}.py"
        path.write_text(_header(module, digest.hexdigest()[:16]) + bodies[name], encoding="utf-8")
        written.append(path)
    return written
