"""Devices, CUDA pinning and the declared instances, without a GPU."""

from __future__ import annotations

import pytest

from embedfleet.config import ConfigError, FleetSettings
from embedfleet.fleet.devices import DeviceError, parse_device, placement, spread, visible_gpus
from embedfleet.fleet.plan import declared, default_name, reconcile
from embedfleet.fleet.spec import InstanceRequest, InstanceSpec


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,1"}) == ["0"]  # CUDA stops at the first invalid id
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-1a2b,GPU-3c4d"}) == ["GPU-1a2b", "GPU-3c4d"]


def test_each_child_sees_exactly_its_gpu() -> None:
    gpus = ["2", "3"]  # the fleet itself was started with CUDA_VISIBLE_DEVICES=2,3
    assert placement(parse_device("cuda:1", gpus), gpus).env == {"CUDA_VISIBLE_DEVICES": "3"}
    assert placement(parse_device("cuda:1", gpus), gpus).device == "cuda:0"
    assert placement(parse_device("0", gpus), gpus).env == {"CUDA_VISIBLE_DEVICES": "2"}
    assert placement(parse_device("cuda", gpus), gpus).env == {"CUDA_VISIBLE_DEVICES": "2"}
    cpu = placement(parse_device("cpu", gpus), gpus)
    assert cpu.device == "cpu" and cpu.env == {"CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.parametrize("device", ["cuda:2", "7", "gpu", "cuda:x", "", "cuda:-1"])
def test_devices_that_do_not_exist_are_refused(device: str) -> None:
    with pytest.raises(DeviceError):
        parse_device(device, ["0", "1"])
    with pytest.raises(DeviceError, match="no GPU"):
        parse_device("cuda:0", [])


def test_spread_is_round_robin() -> None:
    assert spread(5, ["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]


def test_default_plan_one_worker_per_gpu() -> None:
    specs = declared(FleetSettings(), gpus=["0", "1", "2"], cpus=16)
    assert [(s.name, s.device, s.threads) for s in specs] == [
        ("default-0", "cuda:0", None), ("default-1", "cuda:1", None), ("default-2", "cuda:2", None)]
    assert {s.pool for s in specs} == {"default"}


def test_default_plan_on_cpu_is_one_single_thread_worker_per_core() -> None:
    specs = declared(FleetSettings(), gpus=[], cpus=4)
    assert [(s.device, s.threads) for s in specs] == [("cpu", 1)] * 4
    one = declared(FleetSettings(replicas=1), gpus=[], cpus=4)
    assert [(s.name, s.threads) for s in one] == [("default", 4)]


def test_declared_instances_embedder_on_two_gpus_reranker_on_the_third() -> None:
    settings = FleetSettings(instances=[
        {"name": "embed", "model": "BAAI/bge-base-en-v1.5", "replicas": 2, "devices": ["0", "1"]},
        {"name": "rerank", "model": "BAAI/bge-reranker-base", "gpu_id": 2, "task": "reranker"},
        {"name": "shared", "model": "default", "device": "cuda:0"},
    ])
    specs = declared(settings, gpus=["0", "1", "2"], cpus=8)
    assert [(s.name, s.device, s.pool) for s in specs] == [
        ("embed-0", "cuda:0", "BAAI/bge-base-en-v1.5"), ("embed-1", "cuda:1", "BAAI/bge-base-en-v1.5"),
        ("rerank", "cuda:2", "BAAI/bge-reranker-base"), ("shared", "cuda:0", "default")]


@pytest.mark.parametrize("table", [
    {"name": "../etc", "model": "default"},
    {"name": "a/b", "model": "default"},
    {"name": "x", "model": "default", "device": "cuda:0"},  # no GPU here
    {"name": "x"},  # neither model nor url
    {"name": "x", "model": "default", "url": "http://h:1"},
    {"name": "x", "model": "default", "bogus": 1},
])
def test_invalid_declarations_are_config_errors(table: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        declared(FleetSettings(instances=[table]), gpus=[], cpus=2)


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="declared twice"):
        declared(FleetSettings(instances=[{"name": "a", "model": "default"}, {"name": "a", "model": "x"}]),
                 gpus=[], cpus=2)


@pytest.mark.parametrize("name", ["..", "../x", "a..b", ".hidden", "a/b", "a b", "", "x" * 64, "é"])
def test_instance_names_that_could_escape_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        InstanceRequest(name=name, model="default")


def test_default_names() -> None:
    assert default_name("BAAI/bge-small-en-v1.5") == "bge-small-en-v1.5"
    assert default_name("/models/my model/") == "my-model"
    assert default_name("default") == "default"


def test_reconcile_config_wins_user_stop_kept_api_instances_kept() -> None:
    saved = [
        {"spec": {"name": "a", "model": "old"}, "stopped": True, "origin": "config"},
        {"spec": {"name": "gone", "model": "x"}, "stopped": False, "origin": "config"},
        {"spec": {"name": "live", "model": "y"}, "stopped": True, "origin": "api"},
        {"spec": {"name": "../bad"}, "stopped": False, "origin": "api"},
    ]
    config = [InstanceSpec(name="a", model="new"), InstanceSpec(name="b", model="z")]
    result = {d.spec.name: (d.spec.model, d.stopped, d.origin) for d in reconcile(saved, config)}
    assert result == {"a": ("new", True, "config"), "b": ("z", False, "config"), "live": ("y", True, "api")}
