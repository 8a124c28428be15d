"""Plugin loading and name -> factory registries.

Plugins are discovered through the ``distillkit`` entry-point group (built-in
methods included), plus the host's own default plugin
(:mod:`distillkit.builtins`) and, optionally, ``*.py`` files in a plugins
directory. A plugin that fails (at import, at registration, or because a hook
is misspelled or unmarked) is recorded with its error in
:attr:`Plugins.failures`, contributes nothing from the failing step, and the
others still load. Two plugins registering the same name is an error naming
both: neither can be chosen silently.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping

import pluggy

from distillkit import hookspecs
from distillkit.errors import UsageError
from distillkit.zoo.registration import mirror

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
    #: plugins that failed to load (shared with :class:`Plugins`), named in unknown-name errors
    failed: Mapping[str, Any] = field(default_factory=dict)

    def check_name(self, name: object, plugin: str) -> None:
        if not isinstance(name, str) or not name:
            raise UsageError(f"plugin {plugin!r} registered a {self.singular} with an invalid name {name!r}")

    def add(self, name: str, factory: Callable[..., Any], plugin: str) -> None:
        self.check_name(name, plugin)
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
                f"{self._failed_hint()}"
            ) from None

    def _failed_hint(self) -> str:
        # the name may belong to a plugin that did not load: say so instead of leaving the user guessing
        if not self.failed:
            return ""
        return f" (plugins that failed to load: {', '.join(sorted(self.failed))}; see `distillkit plugins`)"

    def create(self, name: str, host: Mapping[str, Any] | None = None, **options: Any) -> Any:
        """Call ``name``'s factory with the ``host`` arguments (spec, device, ...) and the user's ``options``.

        Any exception from the factory becomes one :class:`UsageError` line naming the component, its plugin
        and the user's options (the host arguments are the interface's, not the user's to fix)."""
        entry = self.get(name)
        factory = entry.factory
        if not callable(factory):  # methods and protocols may register instances
            if options:
                raise UsageError(f"{self.singular} {name!r} takes no options, got {sorted(options)}")
            return factory
        reserved = sorted(set(options) & set(host or {}))
        if reserved:
            raise UsageError(f"{self.singular} {name!r}: option {reserved[0]!r} is passed by distillkit itself and "
                             f"cannot be set")
        try:
            return factory(**(host or {}), **options)
        except UsageError:
            raise
        except Exception as exc:  # a factory's own validation (ValueError, TypeError, ...) is the user's to fix
            message = " ".join(str(exc).split())[:300]
            raise UsageError(f"{self.singular} {name!r} (plugin {entry.plugin!r}) could not be built with options "
                             f"{options}: {type(exc).__name__}: {message}") from exc

    def match(self, patterns: Iterable[str]) -> list[str]:
        """Names matching any glob pattern, in pattern order; plain names pass through unchanged."""
        out: list[str] = []
        for pattern in patterns:
            if any(ch in pattern for ch in "*?["):
                hits = fnmatch.filter(self.names(), pattern)
                if not hits:
                    raise UsageError(f"no {self.kind} match {pattern!r}; choose from: {', '.join(self.names())}"
                                     f"{self._failed_hint()}")
                out.extend(h for h in hits if h not in out)
            elif pattern not in out:
                out.append(pattern)
        return out


@dataclass(frozen=True)
class PluginInfo:
    """One row of ``distillkit plugins``."""

    name: str
    package: str  # distribution name, or the file path of a --plugins-dir plugin
    version: str
    hooks: tuple[str, ...]  # hooks the plugin implements, in KINDS order
    registers: dict[str, tuple[str, ...]]  # kind -> names it registered
    error: str | None = None  # one line per failure, joined with "; "
    traceback: str | None = None  # full tracebacks, for --debug


@dataclass
class Failure:
    """Why a plugin (or part of it) did not load."""

    package: str
    version: str
    errors: list[str] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)


class Plugins:
    """The plugin manager plus one :class:`Registry` per component kind."""

    def __init__(self, plugins_dir: str | os.PathLike | None = None) -> None:
        self.pm = pluggy.PluginManager("distillkit")
        self.pm.add_hookspecs(hookspecs)
        self.failures: dict[str, Failure] = {}
        self._dists: dict[str, tuple[str, str]] = {}  # plugin name -> (package, version)
        self._register_builtins()
        self._load_entry_points()
        if plugins_dir is not None:
            self._load_directory(Path(plugins_dir))
        self.registries = {kind: Registry(kind, failed=self.failures) for kind in KINDS}
        self._collect()

    # -- loading ---------------------------------------------------------
    def _register_builtins(self) -> None:
        from distillkit import builtins

        self._add("distillkit", lambda: builtins, "distillkit", _version("distillkit"))

    def _load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            self._add(ep.name, ep.load, ep.dist.name if ep.dist else "?", ep.dist.version if ep.dist else "?")

    def _load_directory(self, directory: Path) -> None:
        if not directory.is_dir():
            raise UsageError(f"--plugins-dir {str(directory)!r} is not a directory")
        for path in sorted(directory.glob("*.py")):
            self._add(path.stem, lambda path=path: _import_file(path), str(path), "-")

    def _add(self, name: str, load: Callable[[], object], package: str, version: str) -> None:
        """Import one plugin and register it, or record why not; never raises for the plugin's faults."""
        owner = self._dists[name][0] if name in self._dists else getattr(self.failures.get(name), "package", None)
        if owner is not None:
            # keyed apart so the error does not land on the plugin that owns the name
            self._fail(f"{name} ({package})", package, version,
                       f"plugin name {name!r} is already taken by {owner}; rename this plugin")
            return
        try:
            module = load()
            self.pm.register(module, name=name)
        except (Exception, SystemExit) as exc:  # a broken plugin must not take the others down
            self._fail(name, package, version, exc)
            return
        self._dists[name] = (package, version)
        for problem in self._hook_problems(module):
            self._fail(name, package, version, problem)

    def _hook_problems(self, module: object) -> list[str]:
        """Misspelled hooks and hook functions missing ``@hookimpl``: pluggy would ignore both silently."""
        problems = []
        for caller in self.pm.get_hookcallers(module) or []:
            if caller.spec is None:
                close = difflib.get_close_matches(caller.name, KINDS.values(), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"hooks are: {', '.join(KINDS.values())}"
                problems.append(f"unknown hook {caller.name!r}; {hint}")
        for hook_name in KINDS.values():
            if callable(getattr(module, hook_name, None)) and self.pm.parse_hookimpl_opts(module, hook_name) is None:
                problems.append(f"{hook_name} is not marked with @hookimpl (from distillkit import hookimpl)")
        return problems

    def _fail(self, name: str, package: str, version: str, problem: BaseException | str) -> None:
        failure = self.failures.setdefault(name, Failure(package, version))
        if isinstance(problem, BaseException):
            failure.errors.append(_one_line(problem))
            failure.tracebacks.append("".join(traceback.format_exception(problem)))
        else:
            failure.errors.append(problem)
            failure.tracebacks.append(problem + "\n")

    def _collect(self) -> None:
        for kind, hook_name in KINDS.items():
            registry = self.registries[kind]
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                plugin_name = impl.plugin_name
                found: list[tuple[str, Callable[..., Any]]] = []

                def register(name: str, factory: Callable[..., Any], _p: str = plugin_name,
                             _found: list = found) -> None:
                    registry.check_name(name, _p)
                    _found.append((name, factory))

                try:
                    impl.function(register)
                except Exception as exc:  # the hook contributes nothing; the plugin's other hooks stand
                    self._fail(plugin_name, *self._dists.get(plugin_name, ("?", "?")), exc)
                    continue
                for name, factory in found:  # a name taken by another plugin raises, naming both
                    registry.add(name, factory, plugin_name)
        for entry in self.registries["models"].entries.values():  # timm.create_model finds plugin models too
            try:
                mirror(entry.name, entry.factory)
            except Exception as exc:  # the model still works through distillkit; timm just does not list it
                self._fail(entry.plugin, *self._dists.get(entry.plugin, ("?", "?")), exc)

    # -- queries ---------------------------------------------------------
    def __getitem__(self, kind: str) -> Registry:
        try:
            return self.registries[kind]
        except KeyError:
            raise UsageError(f"unknown kind {kind!r}; choose one of: {', '.join(KINDS)}") from None

    def info(self) -> list[PluginInfo]:
        """Every plugin that loaded or failed: the host's own first, then by name."""
        rows = []
        order = list(KINDS.values())
        for name, plugin in self.pm.list_name_plugin():
            callers = [c.name for c in self.pm.get_hookcallers(plugin) or []]
            hooks = tuple(sorted(callers, key=lambda h: (order.index(h) if h in order else len(order), h)))
            registers = {kind: names for kind, reg in self.registries.items()
                         if (names := tuple(e.name for e in reg.entries.values() if e.plugin == name))}
            rows.append(self._row(name, *self._dists[name], hooks, registers))
        for name, failure in self.failures.items():
            if self.pm.get_plugin(name) is None:
                rows.append(self._row(name, failure.package, failure.version, (), {}))
        return sorted(rows, key=lambda r: (r.name != "distillkit", r.name))

    def _row(self, name: str, package: str, version: str, hooks: tuple[str, ...],
             registers: dict[str, tuple[str, ...]]) -> PluginInfo:
        failure = self.failures.get(name)
        if failure is None:
            return PluginInfo(name, package, version, hooks, registers)
        return PluginInfo(name, package, version, hooks, registers, "; ".join(failure.errors),
                          "".join(failure.tracebacks))


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _one_line(exc: BaseException) -> str:
    """``Type: message (file:line)``, pointing at the plugin's own code rather than at the loader's."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f.filename != __file__ and not f.filename.startswith("<frozen")
              and f"{os.sep}importlib{os.sep}" not in f.filename]
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = " ".join(str(exc).split())  # one line, whatever the plugin put in its message
    return f"{type(exc).__name__}: {message}{where}"


def _import_file(path: Path) -> ModuleType:
    module_name = f"distillkit_plugins_dir.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]  # a half-executed module must not be found by a later import
        raise
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


def create(kind: str, name: str, host: Mapping[str, Any] | None = None, **options: Any) -> Any:
    """Build the component ``name`` of ``kind`` with the ``host`` arguments its interface names and the user's
    ``options``: the one way the core makes components."""
    return plugins()[kind].create(name, host, **options)


def declares(factory: Callable[..., Any], parameter: str) -> bool:
    """Whether ``factory`` (a function or class) names ``parameter`` in its signature (``**kwargs`` does not
    count: the host passes optional arguments such as ``data`` only to factories that ask for them)."""
    try:
        return parameter in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
