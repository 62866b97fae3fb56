"""The chart serves OIP over gRPC: Serve's grpc_options, a container port on every Ray pod,
a Service for it (KubeRay's serve Service carries only the port named ``serve``), and the
NetworkPolicy lets clients reach it. ``ports.grpc: 0`` turns all of it off."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from conftest import RELEASE, Docs, by_kind, one

from serving.server.launch import grpc_options

pytestmark = pytest.mark.helm


def _serve_config(docs: Docs) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    return loaded


def _ray_containers(docs: Docs) -> list[dict[str, Any]]:
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [p["spec"]["containers"][0] for p in pods]


def test_serve_config_turns_on_grpc_with_the_servicer_serve_uses(render: Callable[..., Docs]) -> None:
    """The same grpc_options ``serving serve`` passes, and the function it names imports."""
    options = _serve_config(render())["grpc_options"]
    assert options == grpc_options(8001)
    module, _, name = options["grpc_servicer_functions"][0].rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))


def test_every_ray_pod_exposes_the_grpc_port_and_a_service_selects_them(render: Callable[..., Docs]) -> None:
    docs = render()
    for container in _ray_containers(docs):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == 8001, container["name"]
    (service,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == f"{RELEASE}-grpc"]
    (port,) = service["spec"]["ports"]
    assert (port["port"], port["targetPort"], port["appProtocol"]) == (8001, "grpc", "kubernetes.io/h2c")
    selector = service["spec"]["selector"]
    assert selector["ray.io/serve"] == "true"
    pod_labels = one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]
    assert {k: v for k, v in selector.items() if k != "ray.io/serve"}.items() <= pod_labels["labels"].items()


def test_network_policy_opens_the_grpc_port_beside_http(render: Callable[..., Docs]) -> None:
    docs = render(sets=["networkPolicy.enabled=true"])
    rules = one(docs, "NetworkPolicy")["spec"]["ingress"]
    serving_ports = [[p["port"] for p in r["ports"]] for r in rules if "ports" in r]
    assert [8000, 8001] in serving_ports


def test_grpc_port_zero_turns_grpc_off(render: Callable[..., Docs]) -> None:
    docs = render(sets=["ports.grpc=0", "networkPolicy.enabled=true"])
    assert "grpc_options" not in _serve_config(docs)
    assert all("grpc" not in {p["name"] for p in c["ports"]} for c in _ray_containers(docs))
    assert not [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-grpc")]
    rules = one(docs, "NetworkPolicy")["spec"]["ingress"]
    assert all(8001 not in [p["port"] for p in r.get("ports", [])] for r in rules)
