"""The method's options on the command line: ``--method.alpha 5`` (or ``--trainer.callbacks.alpha 5``).

A config lists the method (``ITA``, ``IEL`` or a baseline, a :class:`~lightning_taylor.callbacks.SecondOrder`)
among its ``trainer.callbacks``, usually first. jsonargparse applies ``--trainer.callbacks.NAME VALUE`` to the
*last* callback of the list (in the shipped configs, ``ModelCheckpoint``), so on its own it cannot reach the
method. The command therefore takes these options out of the command line before parsing:

- ``--method.NAME VALUE`` (or ``--method.NAME=VALUE``): an argument of the config's method callback;
- ``--trainer.callbacks.NAME VALUE`` when ``NAME`` is an argument of a method callback (``alpha``, ``rank``,
  ``curvature``, ...); any other name keeps jsonargparse's meaning (the last callback).

The command line is then parsed once without them, the one method callback of the resulting list gets the new
values (each read and checked against its argument's type, as jsonargparse reads command-line values), and the whole list is given back as a final
``--trainer.callbacks=[...]``, which replaces the list; the second parse checks every value against its type,
so the saved ``config.yaml`` holds the values the run used.
"""

from __future__ import annotations

import importlib
import inspect
import json
from argparse import ArgumentError
from typing import (
    Any,
    Iterable,
    Literal,
    Sequence,
    get_args,
    get_origin,
    get_type_hints,
)

import yaml
from jsonargparse import ArgumentParser

from lightning_taylor.callbacks import (
    IEL,
    ITA,
    LinearProbe,
    SecondOrder,
    SequentialFineTuning,
)
from lightning_taylor.errors import expected

METHOD_GROUP = "--method."
CALLBACKS_GROUP = "--trainer.callbacks."
#: options that only print (help, the resolved config): left out of the first parse
_PRINTING = ("-h", "--help", "--print_config")


def init_arguments(cls: type) -> list[str]:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the class hierarchy."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
        names += [p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


#: every argument of a method callback: such a ``--trainer.callbacks.NAME`` is meant for the method
METHOD_ARGUMENTS = frozenset(name for cls in (ITA, IEL, LinearProbe, SequentialFineTuning)
                             for name in init_arguments(cls))


def split_method_options(args: Sequence[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """``args`` without the method's options, and those options as ``(flag, name, raw value)``."""
    rest: list[str] = []
    options: list[tuple[str, str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        flag, sep, value = arg.partition("=")
        name = _method_name(flag)
        if name is None:
            rest.append(arg)
        elif sep:
            options.append((flag, name, value))
        elif i + 1 < len(args):
            options.append((flag, name, args[i + 1]))
            i += 1
        else:
            raise expected(flag, "a value (e.g. `--method.alpha 5`)", "nothing")
        i += 1
    return rest, options


def _method_name(flag: str) -> str | None:
    if flag.startswith(METHOD_GROUP):
        return flag[len(METHOD_GROUP):]
    if flag.startswith(CALLBACKS_GROUP) and flag[len(CALLBACKS_GROUP):] in METHOD_ARGUMENTS:
        return flag[len(CALLBACKS_GROUP):]
    return None


def with_method_options(callbacks: Iterable[Any], options: Sequence[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """The callback list (``class_path`` / ``init_args`` dicts) with ``options`` set on its one method callback."""
    items = [_as_dict(item) for item in callbacks]
    methods = [i for i, item in enumerate(items) if _is_method(item.get("class_path"))]
    flag = options[0][0]
    if not methods:
        raise expected(flag, "an option of the run's method, a callback (ITA, IEL or a baseline) in "
                       "trainer.callbacks", "a config without one", "Add one with --trainer.callbacks+=ITA.")
    if len(methods) > 1:
        raise expected(flag, "an option of the run's one method callback",
                       f"{len(methods)} of them: {[items[i]['class_path'] for i in methods]}",
                       "Set the option in the config, on the callback it is meant for.")
    method = items[methods[0]]
    cls = _resolve(method["class_path"])
    accepted = init_arguments(cls)
    init_args = dict(method.get("init_args") or {})
    for flag, name, raw in options:
        argument, _, nested = name.partition(".")  # `pretuning.probe_epochs`: a field of a dataclass argument
        if argument not in accepted:
            raise expected(flag, f"an argument of {cls.__name__} ({', '.join(accepted)})", argument)
        if nested:  # checked against the field's type by the second parse
            group = init_args[argument] = dict(_as_dict(init_args[argument]) if init_args.get(argument) else {})
            group[nested] = yaml.safe_load(raw)
        else:
            init_args[name] = typed_value(cls, name, raw, flag)
    method["init_args"] = init_args
    return items


def typed_value(cls: type, name: str, raw: str, flag: str) -> Any:
    """``raw`` read as jsonargparse reads a command-line value for argument ``name`` of ``cls``; else an error."""
    annotation = Any
    for klass in cls.__mro__:
        if name in inspect.signature(klass.__init__).parameters:
            annotation = get_type_hints(klass.__init__).get(name, Any)
            break
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=annotation)
    try:
        return parser.parse_args(["--value", raw]).value
    except ArgumentError:
        if get_origin(annotation) is Literal:
            what = "one of " + ", ".join(map(repr, get_args(annotation)))
        else:
            what = "a value of type " + (getattr(annotation, "__name__", None) or str(annotation).replace("typing.", ""))
        raise expected(flag, what, raw) from None


def callbacks_argument(callbacks: list[dict[str, Any]]) -> str:
    """``--trainer.callbacks=[...]``: replaces the parsed list by ``callbacks``."""
    return "--trainer.callbacks=" + json.dumps(callbacks, default=str)


def without_printing(args: Sequence[str]) -> list[str]:
    """``args`` without ``--help`` / ``--print_config`` (the first parse must not print and exit)."""
    return [a for a in args if a.partition("=")[0] not in _PRINTING]


def _as_dict(item: Any) -> dict[str, Any]:
    if hasattr(item, "as_dict"):
        return item.as_dict()
    if isinstance(item, dict):
        return dict(item)
    raise expected("trainer.callbacks", "class_path / init_args entries (to set the method's options)", item)


def _resolve(class_path: Any) -> type | None:
    module, _, name = str(class_path).rpartition(".")
    try:
        found = getattr(importlib.import_module(module or "lightning_taylor.callbacks"), name, None)
    except ImportError:
        return None
    return found if isinstance(found, type) else None


def _is_method(class_path: Any) -> bool:
    cls = _resolve(class_path) if class_path else None
    return cls is not None and issubclass(cls, SecondOrder)
