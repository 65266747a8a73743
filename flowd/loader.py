"""Finds task scripts (``task_<module>.py``) in the configured task folders and loads them.

A reference is ``"<module>.<Class>"`` and nothing else: no dotted paths to arbitrary
modules, no ``..``, only files named ``task_*.py`` directly inside a task folder, and
only classes deriving :class:`flowd.task.Task`. A file is re-imported when it changes
on disk, so a new or edited script is picked up without a restart.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from flowd.errors import TaskScriptError
from flowd.task import Task

_REFERENCE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")  # whole string: fullmatch
_MODULE_PREFIX = "flowd_tasks."


@dataclass(frozen=True)
class ScriptInfo:
    """One Task class found in a task folder, without running the file."""

    reference: str
    path: str
    doc: str
    error: str | None = None  # a file that cannot be read (reference and doc empty)


def parse_reference(reference: str) -> tuple[str, str]:
    """Split ``"module.Class"``; raises TaskScriptError for anything else."""
    match = _REFERENCE.fullmatch(reference) if isinstance(reference, str) else None
    if not match:
        raise TaskScriptError(
            f"{reference!r} is not a task script reference; write it as module.Class, e.g. "
            "'example.VeryLong' for class VeryLong in task_example.py")
    return match.group(1), match.group(2)


def check_inside(path: Path, task_paths: Iterable[str]) -> None:
    """Refuse a script that is (or sits behind) a symbolic link leading out of the task
    folders: only what lies inside them may run."""
    real = path.resolve()
    for folder in task_paths:
        if real.is_relative_to(Path(folder).resolve()):
            return
    raise TaskScriptError(f"{path} is a symbolic link to {real}, outside the task folders; flowd runs only "
                          "files inside them (copy the file in instead)")


def find_script_file(module: str, task_paths: Iterable[str]) -> Path:
    """The first ``task_<module>.py`` in the task folders; raises TaskScriptError when it
    is missing or a symbolic link out of them."""
    paths = list(task_paths)
    for folder in paths:
        candidate = Path(folder) / f"task_{module}.py"
        if candidate.is_file():
            check_inside(candidate, paths)
            return candidate
    raise TaskScriptError(f"no file task_{module}.py in the task folders ({', '.join(paths) or 'none configured'})")


class ScriptLoader:
    """Loads Task classes by reference, re-importing a file when it changes on disk."""

    def __init__(self, task_paths: Iterable[str]):
        self.task_paths = tuple(task_paths)
        self._modules: dict[Path, tuple[tuple[int, int], ModuleType]] = {}
        self._paths: dict[str, Path] = {}  # module -> its file, found once
        self._round: dict[str, tuple[Path, os.stat_result]] | None = None  # stats taken this round
        self._round_classes: dict[str, type[Task]] = {}  # classes loaded this round, by reference

    def new_round(self) -> None:
        """A worker starts a round of steps (flowd.engine.batch): each script file is looked at
        once in it, not once per step. The round starts after its flows were claimed, so
        a file changed before a flow was submitted is always seen by its steps."""
        self._round = {}
        self._round_classes = {}

    def end_rounds(self) -> None:
        """The worker's batch is over: one stat per load again."""
        self._round = None
        self._round_classes = {}

    def _script_file(self, module: str) -> tuple[Path, os.stat_result]:
        """The module's file and its stat: one stat per step (per round in a worker)
        while the file stays put."""
        if self._round is None:
            return self._stat_script(module)
        return _memo(self._round, module, self._stat_script)

    def _stat_script(self, module: str) -> tuple[Path, os.stat_result]:
        path = self._paths.get(module)
        if path is not None:
            try:
                return path, path.stat()
            except FileNotFoundError:
                del self._paths[module]
        path = find_script_file(module, self.task_paths)
        self._paths[module] = path
        return path, path.stat()

    def load(self, reference: str) -> type[Task]:
        """The Task subclass behind ``reference``; raises TaskScriptError naming file and line.
        In a round, a reference found once is that class for the rest of it: its file was
        looked at once in the round anyway."""
        if self._round is None:
            return self._load(reference)
        return _memo(self._round_classes, reference, self._load)

    def _load(self, reference: str) -> type[Task]:
        module_name, class_name = parse_reference(reference)
        path, stat = self._script_file(module_name)
        module = self._import(path, module_name, stat)
        cls = getattr(module, class_name, None)
        if cls is None:
            raise TaskScriptError(f"{path} has no class {class_name} (reference '{reference}')")
        if not (isinstance(cls, type) and issubclass(cls, Task)) or cls is Task:
            raise TaskScriptError(f"{path}: {class_name} is not a subclass of flowd.task.Task "
                                  f"(reference '{reference}')")
        return cls

    def _import(self, path: Path, module_name: str, stat: os.stat_result) -> ModuleType:
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._modules.get(path)
        if cached and cached[0] == stamp:
            return cached[1]
        check_inside(path, self.task_paths)  # again: the file may have been replaced since it was found
        qualified = _MODULE_PREFIX + module_name
        spec = importlib.util.spec_from_file_location(qualified, path)
        if spec is None or spec.loader is None:
            raise TaskScriptError(f"{path} cannot be loaded as a Python file")
        module = importlib.util.module_from_spec(spec)
        try:
            source = path.read_bytes()
            code = compile(source, str(path), "exec", dont_inherit=True)
            sys.modules[qualified] = module
            exec(code, module.__dict__)
        except SyntaxError as exc:
            sys.modules.pop(qualified, None)
            raise TaskScriptError(f"{path}, line {exc.lineno}: syntax error: {exc.msg}") from exc
        except Exception as exc:
            sys.modules.pop(qualified, None)
            line = _innermost_line(exc, str(path))
            raise TaskScriptError(f"{path}{f', line {line}' if line else ''}: importing the script raised "
                                  f"{type(exc).__name__}: {exc}") from exc
        self._modules[path] = (stamp, module)
        return module


def _innermost_line(exc: BaseException, filename: str) -> int | None:
    tb = exc.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def list_scripts(task_paths: Iterable[str], errors: list[str] | None = None, *,
                 broken: bool = False) -> list[ScriptInfo]:
    """Every Task class in the task folders, found by reading (not running) the files.

    A file that cannot be read or parsed raises TaskScriptError; when ``errors`` is a
    list it is skipped with its message appended there; with ``broken`` it is listed in
    its place, with its ``error``.
    """
    task_paths = tuple(task_paths)
    found: list[ScriptInfo] = []
    seen: set[str] = set()
    for folder in task_paths:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            if not (name.startswith("task_") and name.endswith(".py")):
                continue
            module = name[len("task_"):-3]
            path = Path(folder) / name
            try:
                check_inside(path, task_paths)
                classes = _task_classes(path)
            except TaskScriptError as exc:
                if broken:
                    found.append(ScriptInfo("", str(path), "", str(exc)))
                elif errors is None:
                    raise
                else:
                    errors.append(str(exc))
                continue
            for class_name, doc in classes:
                reference = f"{module}.{class_name}"
                if reference not in seen:
                    seen.add(reference)
                    found.append(ScriptInfo(reference, str(path), doc))
    return found


def check_reference(reference: str, task_paths: Iterable[str]) -> Path:
    """Check, without running it, that ``reference`` names a Task class in a script file."""
    module, class_name = parse_reference(reference)
    path = find_script_file(module, task_paths)
    classes = {name for name, _ in _task_classes(path)}
    if class_name not in classes:
        available = ", ".join(sorted(f"{module}.{c}" for c in classes)) or "none"
        raise TaskScriptError(f"{path} has no Task class {class_name}; it defines: {available}")
    return path


def _task_classes(path: Path) -> list[tuple[str, str]]:
    """Classes in ``path`` that derive from Task (directly or from another Task class there)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as exc:
        raise TaskScriptError(f"{path}, line {exc.lineno}: syntax error: {exc.msg}") from exc
    except OSError as exc:
        raise TaskScriptError(f"{path} cannot be read: {exc.strerror}") from exc
    task_names = {"Task"}
    result: list[tuple[str, str]] = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", None) for b in node.bases}
        if bases & task_names:
            task_names.add(node.name)
            doc = (ast.get_docstring(node) or "").strip().splitlines()
            result.append((node.name, doc[0] if doc else ""))
    return result


_T = TypeVar("_T")


def _memo(cache: dict[str, _T], key: str, compute: Callable[[str], _T]) -> _T:
    """``compute(key)``, worked out once while ``cache`` lives (a worker's round)."""
    found = cache.get(key)
    if found is None:
        found = cache[key] = compute(key)
    return found
