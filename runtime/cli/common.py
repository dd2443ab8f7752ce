"""Helpers the verbs share: configuration flags made from a settings dataclass, and the Scission
constraint flags of ``edgesplit plan`` and ``edgesplit planner query``."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, get_type_hints

from runtime.contracts.config import load_config
from runtime.contracts.costmodel import OBJECTIVES

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from runtime.wire.transport import TransportOptions

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
    """What ``edgesplit``'s root parser passes each verb's ``add_parser``."""


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it in words (no second "(default: ...)")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action)


T = TypeVar("T", bound="DataclassInstance")  # a settings dataclass

# repeatable flags whose field names are plural
FLAG_NAMES = {"models": "model", "tls": "tl", "next_tiers": "next_tier", "next_hops": "next_hop", "halo_peers": "halo_peer"}


def components() -> dict[str, tuple[type, str]]:
    """The daemons: name -> (settings dataclass, TOML section); ``edgesplit print-config NAME`` shows each."""
    from planner.config import PlannerConfig
    from runtime.agent.config import AgentConfig
    from runtime.worker.config import WorkerConfig

    return {"worker": (WorkerConfig, "worker"), "agent": (AgentConfig, "agent"), "planner": (PlannerConfig, "planner")}


def add_config_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field; defaults shown, values left None unless given."""
    p.add_argument("--config", metavar="FILE", help="TOML file with a [section] of these settings")
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + FLAG_NAMES.get(f.name, f.name).replace("_", "-")
        if f.default is not dataclasses.MISSING:
            default: object = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:  # as before (MISSING() failed), with the reason
            raise TypeError(f"{cls.__name__}.{f.name} has no default: every setting needs one")
        # argparse %-formats help strings: a literal % (as in "10 %") must be doubled
        help_text = f.metadata.get("help", "")
        if "(default" not in help_text:  # a help that says its default in words keeps only those
            help_text = f"{help_text} (default: {default!r})"
        help_text = help_text.replace("%", "%%")
        typ = str(hints[f.name])
        if "tuple" in typ:
            p.add_argument(flag, dest=f.name, action="append", metavar="VALUE", help=help_text + "; repeatable")
        elif typ == "bool" or typ == "<class 'bool'>":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            conv: Callable[[str], Any] = int if "int" in typ else float if "float" in typ else str
            p.add_argument(flag, dest=f.name, type=conv, metavar=f.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace, cls: type[T], section: str) -> T:
    """The effective ``cls`` settings: defaults < the --config file's [section] < env < flags given."""
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return load_config(cls, section, config_file=args.config, overrides=overrides)


def component_config(args: argparse.Namespace, component: str) -> Any:
    """The effective settings of ``component`` ("worker", "agent" or "planner": its class, hence Any)."""
    cls, section = components()[component]
    return config_from_args(args, cls, section)


def start_tracing(config: Any, component: str) -> bool:
    """Tracing for this process from the component's ``trace_*`` settings (runtime.daemon.tracing), as
    service ``edgesplit-COMPONENT``; False (and nothing imported) when off or the settings have none."""
    from runtime.daemon.tracing import TracingSettings, configure

    if not isinstance(config, TracingSettings) or config.trace_exporter == "none":
        return False
    return configure(config, f"edgesplit-{component}")


def add_constraint_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, names: str, overriding: bool = False) -> None:
    """The Scission constraint flags, shared by ``edgesplit plan`` and ``edgesplit planner query``.
    ``names``: what --include/--exclude name ("machine" or "worker"); ``overriding``: every default is
    None (a flag given replaces the registered value, one left out keeps it)."""
    upper = names.upper()
    p.add_argument("--pin-layer", action="append", metavar="LAYER=TIER", help="the block holding this layer runs on TIER")
    p.add_argument("--pin-block", action="append", metavar="BLOCK=TIER", help="this block (index or name) runs on TIER")
    p.add_argument("--forbid-block", action="append", metavar="BLOCK=TIER", help="this block must not run on TIER")
    p.add_argument("--raw-input-stays", action="store_true", help="the device runs the first block (privacy)")
    p.add_argument("--max-upload", action="append", metavar="TIER=BYTES", help="cap on bytes a tier sends per frame")
    p.add_argument("--max-tier-seconds", action="append", metavar="TIER=S", help="cap on a tier's time per frame")
    p.add_argument("--max-tier-share", action="append", metavar="TIER=F", help="cap on a tier's share of the total")
    p.add_argument("--max-memory", action="append", metavar="TIER=BYTES", help="cap on weights a tier holds")
    p.add_argument("--include", action="append", metavar=upper, help=f"use only these {names}s")
    p.add_argument("--exclude", action="append", metavar=upper, help=f"never use this {names}")
    p.add_argument("--min-fidelity", type=float, default=None if overriding else 0.0,
                   help="TLs below this measured fidelity are not used")
    p.add_argument("--objective", choices=OBJECTIVES, default=None if overriding else "latency",
                   help="what to rank by (default: latency)")


def add_client_security_flags(p: argparse.ArgumentParser) -> None:
    """--ca-file/--cert-file/--key-file/--token-file/--server-name/--crl-file for verbs that call a daemon (SECURITY.md)."""
    g = p.add_argument_group("security", "how to reach a daemon that requires TLS, mTLS or a token")
    g.add_argument("--ca-file", default="", help="site CA (PEM) to verify the daemon with")
    g.add_argument("--cert-file", default="", help="client certificate (PEM), e.g. an operator's from 'edgesplit certs issue'")
    g.add_argument("--key-file", default="", help="private key of --cert-file")
    g.add_argument("--token-file", default="", help="file holding a bearer token to send")
    g.add_argument("--server-name", default="", help="name expected in the daemon's certificate if not the dialled host")
    g.add_argument("--crl-file", default="", help="CRL (signed by --ca-file's CA): refuse a daemon whose certificate it revokes")


def client_transport(args: argparse.Namespace) -> TransportOptions:
    """TransportOptions carrying the client security flags of :func:`add_client_security_flags`."""
    from runtime.wire.security import SecurityOptions
    from runtime.wire.transport import TransportOptions

    return TransportOptions(security=SecurityOptions(
        ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file, token_file=args.token_file,
        server_name=args.server_name, crl_file=getattr(args, "crl_file", "")))
