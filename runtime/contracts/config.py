"""Configuration for every daemon, with one precedence rule.

defaults < TOML file (``--config``) < environment (``EDGESPLIT_<COMPONENT>_<FIELD>``) < flags.
An unknown EDGESPLIT_* variable is refused, except the ones Kubernetes sets for a Service of that name
(``EDGESPLIT_WORKER_SERVICE_HOST``, ``..._PORT_50051_TCP`` and the like), which are skipped.

Each component declares one frozen dataclass; every field carries a one-line ``help`` in its
metadata, which the CLI shows in ``--help`` together with the default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from runtime.contracts.errors import InvalidInput
from runtime.contracts.files import read_capped

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # a configuration dataclass

# Kubernetes injects, for every Service in the namespace, <NAME>_SERVICE_HOST, <NAME>_SERVICE_PORT[_<PORTNAME>],
# <NAME>_PORT and <NAME>_PORT_<N>_<PROTO>[_PROTO|_PORT|_ADDR]. A Service named edgesplit-worker therefore
# yields EDGESPLIT_WORKER_SERVICE_HOST and the like, which are no settings: skipped when no field has the name.
_KUBERNETES_SERVICE_KEY = re.compile(r"service_host|service_port(_\w+)?|port|port_\d+_(tcp|udp|sctp)(_(proto|port|addr))?")


MAX_CONFIG_BYTES = 1 << 20  # a --config file is read only up to this (a real one is a few KB)


def field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (shown by ``--help`` and ``print-config``)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def _coerce(name: str, typ: Any, value: Any, origin: str) -> Any:
    """Convert a TOML or environment value to the field's declared type."""
    type_name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if "tuple" in type_name or "list" in type_name:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError(value)  # a list of strings, or one comma-separated string
            return tuple(value)
        if type_name.startswith("bool"):
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
                return bool(value)
            raise TypeError(value)
        if value is None or (isinstance(value, str) and value == "" and "None" in type_name):
            return None
        # TOML gives typed values: refuse true for a number, 3.7 for an int, a list for a string
        if isinstance(value, (bool, list, dict, tuple)):
            raise TypeError(value)
        if type_name.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if type_name.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{origin}: {name} = {value!r} is not a valid {type_name}") from e


def load_config(
    cls: type[T],
    section: str,
    *,
    config_file: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build ``cls`` from defaults, then the TOML ``[section]``, then ``EDGESPLIT_<SECTION>_*``, then overrides.

    ``overrides`` holds the flags a user actually gave (``None`` values are ignored).
    """
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.exists():
            raise InvalidInput(f"config file {path} does not exist")
        raw = read_capped(path, MAX_CONFIG_BYTES, "config file")  # TooLarge / InvalidInput (unreadable)
        try:
            data = tomllib.loads(raw.decode())
        except UnicodeDecodeError as e:
            raise InvalidInput(f"config file {path} is not UTF-8 text: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise InvalidInput(f"config file {path} is not valid TOML: {e}") from None
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise InvalidInput(f"config file {path}: [{section}] must be a table")
        for key, val in table.items():
            key = key.replace("-", "_")
            if key not in names:
                raise InvalidInput(
                    f"config file {path}: unknown key {key!r} in [{section}]; known keys: {', '.join(sorted(names))}"
                )
            values[key] = _coerce(key, hints[key], val, f"config file {path}")
    env = os.environ if env is None else env
    prefix = f"EDGESPLIT_{section.upper()}_"
    for var, val in env.items():
        if var.startswith(prefix):
            key = var[len(prefix):].lower()
            if key not in names and _KUBERNETES_SERVICE_KEY.fullmatch(key):
                continue  # injected by kubelet for a Service named edgesplit-<section>: not a setting
            if key not in names:
                raise InvalidInput(f"environment variable {var} names no {section} setting; known: {', '.join(sorted(names))}")
            values[key] = _coerce(key, hints[key], val, f"environment {var}")
    for key, val in (overrides or {}).items():
        if val is not None:
            values[key] = val
    return cls(**values)


def to_toml(cfg: Any, section: str) -> str:
    """The effective configuration as a TOML table, with each field's help as a comment."""
    lines = [f"[{section}]"]
    for f in dataclasses.fields(cfg):
        val = getattr(cfg, f.name)
        if val is None:
            lines.append(f"# {f.name} = (unset)  # {f.metadata.get('help', '')}")
            continue
        if isinstance(val, bool):
            text = "true" if val else "false"
        elif isinstance(val, (int, float)):
            text = repr(val)
        elif isinstance(val, (tuple, list)):
            text = "[" + ", ".join(_toml_str(str(v)) for v in val) + "]"
        else:
            text = _toml_str(str(val))
        lines.append(f"{f.name} = {text}  # {f.metadata.get('help', '')}")
    return "\n".join(lines) + "\n"


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
