"""tandem.config: the dataclass → CLI → dataclass round trip the services and launcher rely on."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from tandem.config import add_arguments, cli_fields, from_namespace, option, to_argv


@dataclass
class _Cfg:
    role: Literal["prefill", "decode"] = option(help="role")
    num_blocks: int | None = option(None, help="KV blocks", aliases=("--num-gpu-blocks-override",))
    kv_cache_gb: float = option(1.0, help="KV budget (GiB)")
    prefix: bool = option(True, help="prefix caching")
    name: str = option("w", help="name")
    secret: str = option("x", help="not on the CLI", cli=False)

    def __post_init__(self) -> None:
        if self.kv_cache_gb <= 0:
            raise ValueError("kv_cache_gb must be positive")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(p, _Cfg)
    return p


def test_round_trip_through_argv() -> None:
    cfg = _Cfg(role="decode", num_blocks=7, kv_cache_gb=0.5, prefix=False, name="z")
    back = from_namespace(_Cfg, _parser().parse_args(to_argv(cfg)))
    assert back == cfg


def test_defaults_are_left_out_and_none_never_written() -> None:
    assert to_argv(_Cfg(role="prefill")) == ["--role", "prefill"]
    assert "--num-blocks" not in to_argv(_Cfg(role="prefill", num_blocks=None), only_changed=False)


def test_alias_and_required_and_choices() -> None:
    p = _parser()
    ns = p.parse_args(["--role", "prefill", "--num-gpu-blocks-override", "12"])
    assert from_namespace(_Cfg, ns).num_blocks == 12
    with pytest.raises(SystemExit):
        p.parse_args([])  # --role is required
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        p.parse_args(["--role", "nope"])


def test_bool_has_a_negative_form_and_hidden_fields_stay_hidden() -> None:
    ns = _parser().parse_args(["--role", "prefill", "--no-prefix"])
    assert from_namespace(_Cfg, ns).prefix is False
    assert "secret" not in [f.name for f in cli_fields(_Cfg)]
    assert not hasattr(ns, "secret")


def test_dataclass_validation_runs() -> None:
    ns = _parser().parse_args(["--role", "prefill", "--kv-cache-gb", "0"])
    with pytest.raises(ValueError, match="kv_cache_gb"):
        from_namespace(_Cfg, ns)


def test_overrides_and_exclusions() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p, _Cfg, exclude=("role",), defaults={"name": "launcher"})
    ns = p.parse_args([])
    cfg = from_namespace(_Cfg, ns, role="decode")
    assert (cfg.role, cfg.name) == ("decode", "launcher")
    assert to_argv(cfg, exclude=("role",)) == ["--name", "launcher"]
