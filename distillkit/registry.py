"""Plugin loading and name -> factory registries.

Plugins are discovered through the ``distillkit`` entry-point group (built-in
methods included), plus the host's own default plugin
(:mod:`distillkit.builtins`) and, optionally, ``*.py`` files in a plugins
directory. A plugin that fails to import is recorded with its error and the
others still load.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

import pluggy

from distillkit import hookspecs
from distillkit.errors import UsageError

ENTRY_POINT_GROUP = "distillkit"

#: kind -> hook name. The kind is what users type in ``distillkit list KIND``.
KINDS: dict[str, str] = {
    "objectives": "register_objectives",
    "parameterizations": "register_parameterizations",
    "samplers": "register_samplers",
    "methods": "register_methods",
    "protocols": "register_protocols",
    "models": "register_models",
    "datasets": "register_datasets",
}


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    plugin: str


@dataclass
class Registry:
    """Names of one kind of component, each with one factory."""

    kind: str
    entries: dict[str, Entry] = field(default_factory=dict)

    def add(self, name: str, factory: Callable[..., Any], plugin: str) -> None:
        if not isinstance(name, str) or not name:
            raise UsageError(f"plugin {plugin!r} registered a {self.singular} with an invalid name {name!r}")
        if name in self.entries:
            raise UsageError(
                f"{self.singular} {name!r} is registered twice: by {self.entries[name].plugin!r} and by {plugin!r}"
            )
        self.entries[name] = Entry(name, factory, plugin)

    @property
    def singular(self) -> str:
        return self.kind[:-1]

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise UsageError(
                f"unknown {self.singular} {name!r}; choose one of: {', '.join(self.names()) or '(none registered)'}"
            ) from None

    def create(self, name: str, **options: Any) -> Any:
        factory = self.get(name).factory
        if not callable(factory):  # methods and protocols may register instances
            if options:
                raise UsageError(f"{self.singular} {name!r} takes no options, got {sorted(options)}")
            return factory
        try:
            return factory(**options)
        except TypeError as exc:
            raise UsageError(f"bad options {options} for {self.singular} {name!r}: {exc}") from exc

    def match(self, patterns: Iterable[str]) -> list[str]:
        """Names matching any glob pattern, in pattern order; plain names pass through unchanged."""
        out: list[str] = []
        for pattern in patterns:
            if any(ch in pattern for ch in "*?["):
                hits = fnmatch.filter(self.names(), pattern)
                if not hits:
                    raise UsageError(f"no {self.kind} match {pattern!r}; choose from: {', '.join(self.names())}")
                out.extend(h for h in hits if h not in out)
            elif pattern not in out:
                out.append(pattern)
        return out


@dataclass(frozen=True)
class PluginInfo:
    name: str
    package: str
    version: str
    hooks: tuple[str, ...]
    registers: dict[str, tuple[str, ...]]
    error: str | None = None


class Plugins:
    """The plugin manager plus one :class:`Registry` per component kind."""

    def __init__(self, plugins_dir: str | os.PathLike | None = None) -> None:
        self.pm = pluggy.PluginManager("distillkit")
        self.pm.add_hookspecs(hookspecs)
        self.failures: dict[str, tuple[str, str, str]] = {}  # name -> (package, version, error)
        self._dists: dict[str, tuple[str, str]] = {}
        self._register_builtins()
        self._load_entry_points()
        if plugins_dir is not None:
            self._load_directory(Path(plugins_dir))
        self.registries = {kind: Registry(kind) for kind in KINDS}
        self._collect()

    # -- loading ---------------------------------------------------------
    def _register_builtins(self) -> None:
        from distillkit import builtins

        self.pm.register(builtins, name="distillkit")
        self._dists["distillkit"] = ("distillkit", _version("distillkit"))

    def _load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.pm.get_plugin(ep.name) is not None or ep.name in self.failures:
                continue
            package = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            try:
                module = ep.load()
                self.pm.register(module, name=ep.name)
            except Exception as exc:  # a broken plugin must not take the others down
                self.failures[ep.name] = (package, version, _one_line(exc))
                continue
            self._dists[ep.name] = (package, version)

    def _load_directory(self, directory: Path) -> None:
        if not directory.is_dir():
            raise UsageError(f"--plugins-dir {str(directory)!r} is not a directory")
        for path in sorted(directory.glob("*.py")):
            name = f"{path.stem}"
            try:
                module = _import_file(path)
                self.pm.register(module, name=name)
            except Exception as exc:
                self.failures[name] = (str(path), "-", _one_line(exc))
                continue
            self._dists[name] = (str(path), "-")

    def _collect(self) -> None:
        for kind, hook_name in KINDS.items():
            registry = self.registries[kind]
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                plugin_name = impl.plugin_name

                def register(name: str, factory: Callable[..., Any], _p: str = plugin_name) -> None:
                    registry.add(name, factory, _p)

                try:
                    impl.function(register)
                except UsageError:
                    raise
                except Exception as exc:
                    self.failures[plugin_name] = (*self._dists.get(plugin_name, ("?", "?")), _one_line(exc))

    # -- queries ---------------------------------------------------------
    def __getitem__(self, kind: str) -> Registry:
        try:
            return self.registries[kind]
        except KeyError:
            raise UsageError(f"unknown kind {kind!r}; choose one of: {', '.join(KINDS)}") from None

    def info(self) -> list[PluginInfo]:
        rows = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or []))
            registers = {
                kind: tuple(e.name for e in reg.entries.values() if e.plugin == name)
                for kind, reg in self.registries.items()
            }
            package, version = self._dists.get(name, ("?", "?"))
            error = self.failures.get(name, (None, None, None))[2]
            rows.append(PluginInfo(name, package, version, hooks, {k: v for k, v in registers.items() if v}, error))
        for name, (package, version, error) in self.failures.items():
            if self.pm.get_plugin(name) is None:
                rows.append(PluginInfo(name, package, version, (), {}, error))
        return sorted(rows, key=lambda r: (r.name != "distillkit", r.name))


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _one_line(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _import_file(path: Path) -> ModuleType:
    module_name = f"distillkit_plugins_dir.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


_current: Plugins | None = None


def load_plugins(plugins_dir: str | os.PathLike | None = None) -> Plugins:
    """(Re)load every plugin; later :func:`plugins` calls return this set."""
    global _current
    _current = Plugins(plugins_dir)
    return _current


def plugins() -> Plugins:
    """The loaded plugin set (loading entry points on first use)."""
    return _current if _current is not None else load_plugins(os.environ.get("DISTILLKIT_PLUGINS_DIR") or None)


def create(kind: str, name: str, **options: Any) -> Any:
    """Build the component ``name`` of ``kind`` with ``options``: the one way the core makes components."""
    return plugins()[kind].create(name, **options)
