"""The app config: what deploy/serve.yaml, the chart and `serving serve` all feed build_app."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serving.config import AppConfig
from serving.errors import InvalidReference
from serving.server.launch import add_arguments, app_args_from

ROOT = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store")  # NOTE: the CLI's global option
    add_arguments(parser)
    return parser.parse_args(argv)


def test_deploy_serve_yaml_is_a_valid_app_config() -> None:
    doc = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    app = doc["applications"][0]
    assert app["import_path"] == "serving.server.ray.app:build_app"
    config = AppConfig.model_validate(app["args"])
    assert config.models[0].ref == "iris@production"


def test_unknown_keys_and_duplicate_models_are_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        AppConfig.model_validate({"models": [{"name": "iris"}], "pol_interval_s": 1})
    with pytest.raises(ValidationError, match="unique"):
        AppConfig.model_validate({"models": [{"name": "a"}, {"name": "a"}]})


def test_a_pinned_version_replaces_the_alias_and_autoscaling_replaces_num_replicas() -> None:
    config = AppConfig.model_validate(
        {"models": [{"name": "iris", "version": "7", "autoscaling_config": {"max_replicas": 3}}]}
    )
    model = config.models[0]
    assert (model.alias, model.version, model.ref, model.num_replicas) == (None, "7", "iris:7", None)


def test_serve_defaults_to_the_demo_model_and_refs_override_the_config(tmp_path: Path) -> None:
    assert app_args_from(parse())["models"] == [{"name": "iris", "alias": "production"}]
    args = app_args_from(
        parse("--config", str(ROOT / "deploy" / "serve.yaml"), "--model", "churn:12", "--store", "s3://b/p")
    )
    assert args["models"] == [{"name": "churn", "alias": None, "version": "12"}]
    assert args["store"] == "s3://b/p"
    assert args["poll_interval_s"] == 5


def test_serve_refuses_a_malformed_ref_before_starting_ray() -> None:
    with pytest.raises(InvalidReference):
        app_args_from(parse("--model", "iris@@x"))


def test_max_replicas_per_node_reaches_the_serve_deployment() -> None:
    """``ingress.max_replicas_per_node`` spreads replicas (the cluster suite runs 1); 0 is refused."""
    pytest.importorskip("ray.serve")
    from serving.server.ray.app import build_app

    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        AppConfig.model_validate({"models": [{"name": "iris"}], "ingress": {"max_replicas_per_node": 0}})
    spread = build_app(
        {"models": [{"name": "iris"}], "ingress": {"num_replicas": 2, "max_replicas_per_node": 1}}
    )
    default = build_app({"models": [{"name": "iris"}]})
    # NOTE: private attributes; Ray Serve exposes a bound deployment's options nowhere public.
    assert spread._bound_deployment._replica_config.max_replicas_per_node == 1
    assert default._bound_deployment._replica_config.max_replicas_per_node is None


def test_a_model_set_needs_a_prefix_or_a_name_and_an_alias() -> None:
    from serving.config import AppConfig

    config = AppConfig.model_validate({"models": [{"name": "iris"}, {"prefix": "tenant-"}, {"prefix": ""}]})
    assert [m.name for m in config.named] == ["iris"]
    assert config.set_for("tenant-3") is not None
    assert config.set_for("tenant-3").prefix == "tenant-"  # type: ignore[union-attr]
    assert config.set_for("other").prefix == ""  # type: ignore[union-attr]
    assert config.set_for("iris") is None  # NOTE: a named model is never a member
    assert config.set_for("tenant-3").member("tenant-3").name == "tenant-3"  # type: ignore[union-attr]
    for bad, why in (
        ({"name": "x", "prefix": "x-"}, "not both"),
        ({"prefix": "x-", "version": "1"}, "cannot pin a version"),
        ({"prefix": "x-", "alias": None}, "set the alias"),
        ({"prefix": "../"}, "invalid prefix"),
    ):
        with pytest.raises(ValueError, match=why):
            AppConfig.model_validate({"models": [bad]})
    with pytest.raises(ValueError, match="not a member"):
        AppConfig.model_validate({"models": [{"prefix": "x-"}], "pool": {"pinned": ["y"]}})
    with pytest.raises(ValueError, match="single-hop"):
        AppConfig.model_validate({"models": [{"prefix": "x-"}], "layout": "two-hop"})


def test_shared_workers_start_ahead_only_for_known_formats_and_only_if_kept() -> None:
    models = [{"name": "iris", "workers": "shared"}]
    config = AppConfig.model_validate(
        {"models": models, "shared_workers": {"prestart": ["sklearn", "skops"]}}
    )
    assert config.shared_workers.prestart == ["sklearn", "skops"]
    assert config.shared_workers.keep_idle_s > 0
    with pytest.raises(ValidationError, match="unknown formats"):
        AppConfig.model_validate({"models": models, "shared_workers": {"prestart": ["sklearn.linear_model"]}})
    with pytest.raises(ValidationError, match="needs keep_idle_s above 0"):
        AppConfig.model_validate(
            {"models": models, "shared_workers": {"prestart": ["sklearn"], "keep_idle_s": 0}}
        )
