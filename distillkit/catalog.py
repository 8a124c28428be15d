"""What is installed and what each component takes: the tables behind ``distillkit plugins``, ``list``
and ``describe``.

A component's options are read from its factory's signature, less the arguments the host passes
itself (:data:`HOST_ARGUMENTS`, as :mod:`distillkit.interfaces` defines them), so ``describe`` can never
disagree with what ``--set`` accepts. Methods and protocols are registered as instances: a method's
options are its fields, a protocol's its :meth:`~distillkit.interfaces.EvalProtocol.settings` that
``with_overrides`` accepts.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from distillkit import registry

#: per kind, the factory arguments the host fills in (never the user's to set)
HOST_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "objectives": ("seed", "device"), "parameterizations": ("spec", "ipc", "device", "data"),
    "samplers": ("spec", "seed", "device", "data"), "datasets": (), "models": ("num_classes", "in_chans", "img_size"),
}

#: how a user sets the options of each kind
SET_WITH = {"objectives": "distillkit distill --set objective.OPTION=VALUE",
            "parameterizations": "distillkit distill --set parameterization.OPTION=VALUE",
            "samplers": "distillkit distill --set sampler.OPTION=VALUE",
            "datasets": "distillkit distill --set dataset.OPTION=VALUE",
            "protocols": "distillkit evaluate --set protocol.OPTION=VALUE",
            "methods": "the distill flag of the same name (--lr-img, --iterations, ...) or --set for component options",
            "models": "not settable from the command line (evaluators and extractors are built with the defaults)"}


@dataclass(frozen=True)
class Option:
    name: str
    type: str
    default: str  # repr of the default, or "required"


@dataclass(frozen=True)
class Description:
    kind: str
    name: str
    plugin: str
    doc: str
    options: tuple[Option, ...]
    set_with: str
    extra: str = ""  # e.g. "also accepts **options"


def _annotation(parameter: inspect.Parameter) -> str:
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return "-" if parameter.default is inspect.Parameter.empty else type(parameter.default).__name__
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def factory_options(factory: Callable[..., Any], host: tuple[str, ...]) -> tuple[tuple[Option, ...], str]:
    """The user-settable options of ``factory``, and a note when it also takes arbitrary keywords."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return (), "(its signature cannot be read)"
    options, extra = [], ""
    for p in parameters:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            extra = f"also accepts any keyword (**{p.name})"
        elif p.kind is not inspect.Parameter.VAR_POSITIONAL and p.name not in host:
            default = "required" if p.default is inspect.Parameter.empty else repr(p.default)
            options.append(Option(p.name, _annotation(p), default))
    return tuple(options), extra


def describe(kind: str, name: str) -> Description:
    """Docstring and options of the component ``name`` of ``kind`` (a :class:`UsageError` for unknown names)."""
    entry = registry.plugins()[kind].get(name)
    factory = entry.factory
    if kind == "methods":
        fields = dataclasses.asdict(factory)
        options = tuple(Option(k, type(v).__name__, repr(v)) for k, v in fields.items()
                        if k not in ("name", "description"))
        return Description(kind, name, entry.plugin, _doc(factory.description or type(factory).__doc__),
                           options, SET_WITH[kind])
    if kind == "protocols":
        protocol = factory if not callable(factory) or _is_instance(factory) else factory()
        options = tuple(Option(k, type(v).__name__, repr(v)) for k, v in protocol.settings().items()
                        if _settable(protocol, k, v))
        return Description(kind, name, entry.plugin, _doc(type(protocol).__doc__), options, SET_WITH[kind])
    options, extra = factory_options(factory, HOST_ARGUMENTS.get(kind, ()))
    return Description(kind, name, entry.plugin, _doc(factory.__doc__), options, SET_WITH[kind], extra)


def _settable(protocol: Any, key: str, value: Any) -> bool:
    """Whether ``--set protocol.KEY`` is an option (settings also record what is not: its name, its labels)."""
    try:
        protocol.with_overrides(**{key: value})
    except Exception:  # noqa: BLE001 - any refusal means "not an option"
        return False
    return True


def _is_instance(factory: Any) -> bool:
    """A protocol registered as an instance (callable or not) rather than a class or function."""
    return not (inspect.isclass(factory) or inspect.isfunction(factory) or inspect.ismethod(factory))


def _doc(text: str | None) -> str:
    return inspect.cleandoc(text) if text else "(no docstring)"


def render_description(d: Description) -> RenderableType:
    table = Table()
    for col in ("option", "type", "default"):
        table.add_column(col)
    for option in d.options:
        table.add_row(option.name, option.type, option.default)
    parts: list[RenderableType] = [Text(f"{d.kind[:-1]} {d.name} (plugin {d.plugin})", style="bold"), Text(""),
                                   Text(d.doc), Text("")]
    parts.append(Text(f"options, set with {d.set_with}:" if d.options else "options: none"))
    if d.options:
        parts.append(table)
    if d.extra:
        parts.append(Text(d.extra))
    return Group(*parts)


def names_table(kind: str, pattern: str) -> Table:
    reg = registry.plugins()[kind]
    table = Table(title=f"{kind}")
    for col in ("name", "plugin", "description"):
        table.add_column(col)
    for name in fnmatch.filter(reg.names(), pattern):
        entry = reg.get(name)
        doc = getattr(entry.factory, "description", "") or (entry.factory.__doc__ or "").strip().split("\n")[0]
        table.add_row(name, entry.plugin, doc)
    return table


def plugins_table(rows: list[registry.PluginInfo]) -> Table:
    table = Table(title="distillkit plugins")
    for col in ("plugin", "package", "version", "hooks: registered names", "status"):
        table.add_column(col)
    kinds = {hook: kind for kind, hook in registry.KINDS.items()}
    for info in rows:
        hooks = "\n".join(f"{hook}: {', '.join(info.registers.get(kinds.get(hook, ''), ())) or '-'}"
                          for hook in info.hooks)
        # Text, not markup: error messages may contain [brackets]
        status = Text(f"error: {info.error}", style="red") if info.error else Text("ok")
        table.add_row(info.name, info.package, info.version, hooks or "-", status)
    return table
