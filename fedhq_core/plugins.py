"""Plug-ins named ``package.module:attribute`` (the entry-point syntax of Python packaging).

``model: mypkg.nets:build`` and ``dataset: mypkg.data:load`` name the user's own factory and
loader; :func:`load_object` imports them (the working directory is on the import path, as for
uvicorn's ``module:app``) with a one-line error naming the config field.
:func:`call_with` passes a plug-in the keyword arguments its signature asks for, so a factory
may take ``(in_shape, num_classes)``, only one of them, or nothing.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, DataError

SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_spec(value: str) -> bool:
    return bool(SPEC.match(value or ""))


def load_object(spec: str, field: str) -> Callable[..., Any]:
    """The callable ``spec`` names, or ConfigError ``<field>: ...`` in one line."""
    if not is_spec(spec):
        raise ConfigError(f"{field}: {spec!r} is not package.module:function")
    module_name, attr = spec.split(":")
    # like uvicorn's and gunicorn's "module:app": the working directory is importable, so a
    # project's own package resolves under the `fedhq` console script too
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - the user's module may raise anything on import
        raise ConfigError(f"{field}: cannot import {module_name!r} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{field}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{field}: {spec!r} is not callable")
    return obj


def call_with(fn: Callable[..., Any], field: str, **offered: Any) -> Any:
    """``fn`` called with those of ``offered`` its signature names (all of them if it takes
    ``**kwargs``); a failure inside it is one line naming ``field``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = offered if takes_all else {k: v for k, v in offered.items() if k in params}
    try:
        return fn(**kwargs)
    except (ConfigError, DataError):
        raise
    except Exception as err:  # noqa: BLE001 - the user's code; its error is reported, not hidden
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(f"{field}: {getattr(fn, '__qualname__', fn)} raised {type(err).__name__}: {first}") from None


def source_digest(spec: str) -> str:
    """A digest of the source file of ``spec``'s module ('' when it has none): caches keyed by a
    plug-in's name (the op traces) go stale when its code changes."""
    import hashlib

    if not is_spec(spec):
        return ""
    load_object(spec, "model")   # imported (a no-op when it already is)
    module = sys.modules.get(spec.split(":")[0])
    path = getattr(module, "__file__", None)
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else ""
    except OSError:
        return ""
