"""Every `ModelConfig`, `MIIConfig` and broker setting as a command-line option of `mii serve`
and `mii worker`, and as an environment variable, with its field's description as help.

`--max-length 512` or `MII_MAX_LENGTH=512` sets `max_length`; a broker setting is named
alike (`--max-queue-depth`, `MII_MAX_QUEUE_DEPTH`). Options win over the environment, the
environment over the defaults. Values are validated by the configs themselves, so a bad
one is the same one-line error either way. Booleans take `--flag` / `--no-flag` (in the
environment true/false); optional values take `none`; dicts and lists take JSON.

The environment is read by these commands only: `mii.serve()` and `mii.pipeline()` in
Python take what their caller passes, nothing else.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from mii.broker_config.settings import BrokerSettings
from mii.config import MIIConfig, ModelConfig

ENV_PREFIX = "MII_"
NOT_OPTIONS = {"model_name_or_path", "model_conf", "broker"}
"""Fields given otherwise: the positional model, the nested configs."""


@dataclass(frozen=True)
class Section:
    title: str
    config: type[BaseModel]


MODEL = Section("model (ModelConfig)", ModelConfig)
DEPLOYMENT = Section("deployment (MIIConfig)", MIIConfig)
BROKER = Section("broker (a deployment's queue limits and timings)", BrokerSettings)
SECTIONS = (MODEL, DEPLOYMENT, BROKER)


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def add_config_options(
    parser: argparse.ArgumentParser, sections=SECTIONS, skip: frozenset[str] = frozenset()
) -> None:
    """An option for each field of each section (none set unless given: `config_values`)."""
    for section in sections:
        group = parser.add_argument_group(section.title)
        for name, field in section.config.model_fields.items():
            if name not in NOT_OPTIONS and name not in skip:
                _add_option(group, name, field)


def _add_option(group, name: str, field: FieldInfo) -> None:
    flag = "--" + name.replace("_", "-")
    text = f"{field.description or ''} [{env_name(name)}; default {_default(field)}]"
    text = text.replace("%", "%%")  # argparse formats help with %
    kind = _scalar(field.annotation)
    if kind is bool:
        group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=text)  # fmt: skip
        return
    group.add_argument(flag, dest=name, type=_parser(field.annotation, kind),
                       default=argparse.SUPPRESS, metavar=_metavar(kind), help=text)  # fmt: skip


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "computed"
    value = field.default
    return "none" if value is None else str(getattr(value, "value", value))


def _scalar(annotation) -> type | None:
    """The annotation's one plain type (bool, int, float, str), None for anything else."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if _is_union(annotation) and len(args) == 1:
        annotation = args[0]
    if annotation in (bool, int, float, str):
        return annotation
    if isinstance(annotation, type) and issubclass(annotation, str):  # str enums
        return str
    return None


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _parser(annotation, kind: type | None):
    optional = _is_union(annotation) and type(None) in typing.get_args(annotation)

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        if kind is None:  # dicts, lists, unions of them: JSON (a bare word stays a string)
            try:
                return json.loads(text)
            except ValueError:
                return text
        return text  # the config validates and converts it

    parse.__name__ = (kind or dict).__name__  # argparse names the type in its errors
    return parse


def _metavar(kind: type | None) -> str:
    return {int: "N", float: "X", str: "TEXT"}.get(kind, "JSON")


def config_values(args: argparse.Namespace, sections=SECTIONS) -> dict[str, dict[str, Any]]:
    """Per section, the values the environment and the options set (options winning)."""
    given = vars(args)
    values = {}
    for section in sections:
        fields = [n for n in section.config.model_fields if n not in NOT_OPTIONS]
        from_env = environment_values(section.config, fields)
        from_args = {n: given[n] for n in fields if n in given}
        values[section.title] = from_env | from_args
    return values


def environment_values(config: type[BaseModel], fields: list[str]) -> dict[str, Any]:
    """The `MII_<FIELD>` variables that are set, parsed by pydantic-settings (JSON for
    dicts and lists, `none` for None), validated later by `config` itself."""
    from pydantic_settings import BaseSettings, SettingsConfigDict

    annotations = {n: config.model_fields[n].annotation | None for n in fields}
    namespace = {
        "__annotations__": annotations,
        "model_config": SettingsConfigDict(
            env_prefix=ENV_PREFIX, extra="ignore", env_parse_none_str="none"
        ),  # fmt: skip
        **dict.fromkeys(fields),
    }
    env = type(f"{config.__name__}Environment", (BaseSettings,), namespace)()
    return env.model_dump(exclude_unset=True)


def serve_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`mii.serve` keyword arguments from the options and the environment."""
    values = config_values(args)
    kwargs = values[MODEL.title] | values[DEPLOYMENT.title]
    if values[BROKER.title]:
        kwargs["broker"] = values[BROKER.title]
    return kwargs
