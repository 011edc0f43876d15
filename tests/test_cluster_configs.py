"""The cluster launcher configs in cluster/, checked with Ray's own config code, offline.

`ray up` fills a config out with its provider's defaults (prepare_config) and checks it against
Ray's JSON schema and a few rules of its own (validate_config) before it contacts any cloud; these
tests run those same functions and nothing after them (the AWS steps that follow call boto). For
the local provider the whole of `ray up`'s config bootstrap is offline, so it runs in full.
"""

from __future__ import annotations

import copy
import importlib.metadata
import ipaddress
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

# The configs are checked by Ray's own code (`ray up` runs it): without Ray there is nothing to check with.
pytest.importorskip("ray.autoscaler._private.util", reason="Ray is not importable here", exc_type=ImportError)
from ray.autoscaler._private.commands import _bootstrap_config  # noqa: E402
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIGS = ("gpu", "local")
# GCS, dashboard and Jobs API, client server.
RAY_PORTS = (6379, 8265, 10001)
# pip options of ours that take a value, so the value is not read as a requirement.
PIP_OPTIONS_WITH_VALUE = {"--progress-bar", "-e", "--editable", "-c", "--constraint", "-r", "--requirement"}


def load(name: str) -> dict:
    # `ray up` reads the file with yaml.safe_load too.
    return yaml.safe_load((REPOSITORY / "cluster" / f"{name}.yaml").read_text())


def validated(config: dict) -> dict:
    """The config as `ray up` sees it after its offline checks; raises what `ray up` would."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def node_types(config: dict) -> tuple[dict, dict]:
    """The head's node type and the worker node types of a prepared AWS config."""
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {name: spec for name, spec in types.items() if name != config["head_node_type"]}
    return head, workers


def world_open_ray_ports(ip_permissions: list[dict]) -> set[int]:
    """Ray ports that EC2 ingress rules open to every address (a /0 network, IPv4 or IPv6)."""
    exposed = set()
    for rule in ip_permissions:
        networks = [entry["CidrIp"] for entry in rule.get("IpRanges", [])]
        networks += [entry["CidrIpv6"] for entry in rule.get("Ipv6Ranges", [])]
        if not any(ipaddress.ip_network(network, strict=False).prefixlen == 0 for network in networks):
            continue
        protocol = str(rule.get("IpProtocol", "-1")).lower()
        if protocol in ("-1", "all"):
            low, high = 0, 65535  # every protocol, every port
        elif protocol in ("tcp", "6"):
            low, high = rule.get("FromPort", 0), rule.get("ToPort", 65535)
            if low == -1:
                low, high = 0, 65535
        else:
            continue
        exposed.update(port for port in RAY_PORTS if low <= port <= high)
    return exposed


def pip_installs(commands: list[str]) -> tuple[dict[str, Requirement], list[str]]:
    """Requirements (by name) and editable paths of every `pip install` in shell commands."""
    requirements, editables = {}, []
    for command in commands:
        words = shlex.split(command)
        for start in (index + 1 for index, word in enumerate(words[:-1]) if word.endswith("pip")):
            if words[start] != "install":
                continue
            arguments = iter(words[start + 1 :])
            for word in arguments:
                if word in ("-e", "--editable"):
                    editables.append(next(arguments))
                elif word in PIP_OPTIONS_WITH_VALUE:
                    next(arguments)
                elif not word.startswith("-"):
                    requirement = Requirement(word)
                    requirements[requirement.name.lower()] = requirement
    return requirements, editables


def runjobs_requirement(name: str) -> Requirement:
    """The installed runjobs' own requirement on NAME (pyproject's dependencies)."""
    for text in importlib.metadata.requires("runjobs") or []:
        requirement = Requirement(text)
        if requirement.name.lower() == name and requirement.marker is None:
            return requirement
    raise AssertionError(f"runjobs does not depend on {name}")


def ray_start_commands(config: dict) -> list[str]:
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    return [command for command in commands if "ray start" in command]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_passes_rays_own_validation(name):
    prepared = validated(load(name))
    assert prepared["cluster_name"].startswith("runjobs")


def test_local_config_passes_the_whole_of_ray_ups_bootstrap():
    # For the local provider `ray up`'s bootstrap contacts nothing; no_config_cache keeps it from
    # writing its cache file to the temporary directory.
    bootstrapped = _bootstrap_config(load("local"), no_config_cache=True)
    (node_type,) = bootstrapped["available_node_types"].values()
    workers = len(bootstrapped["provider"]["worker_ips"])
    assert workers >= 1
    assert node_type["min_workers"] == node_type["max_workers"] == workers


@pytest.mark.parametrize("name", CONFIGS)
def test_validation_rejects_a_misspelled_top_level_key(name):
    broken = load(name)
    broken["setup_comands"] = broken.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        validated(broken)


def test_validation_rejects_more_minimum_workers_than_the_cluster_allows():
    broken = load("gpu")
    broken["available_node_types"]["ray.worker.gpu"]["min_workers"] = broken["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validated(broken)


def test_gpu_config_has_an_autoscaling_gpu_worker_type():
    config = validated(load("gpu"))
    _, workers = node_types(config)
    gpu_workers = {name: spec for name, spec in workers.items() if spec["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, f"no worker type declares a GPU: {workers}"
    for name, spec in gpu_workers.items():
        assert spec["resources"]["CPU"] >= 1, name
        assert 1 <= spec["max_workers"] <= config["max_workers"], name
        assert spec["min_workers"] <= spec["max_workers"], name


def test_heads_advertise_no_gpus():
    head, _ = node_types(validated(load("gpu")))
    assert head["resources"].get("GPU") == 0  # stated, not left to what the instance type has
    head_start = " ".join(load("local")["head_start_ray_commands"])
    assert "--num-gpus=0" in head_start


def test_gpu_nodes_use_a_security_group_made_beforehand():
    # A group Ray creates itself always lets SSH in from 0.0.0.0/0; naming an existing group on
    # every node type makes Ray create and change none. All nodes share it, so its
    # "all traffic from this group" rule covers head and workers.
    config = validated(load("gpu"))
    groups = {
        tuple(spec["node_config"].get("SecurityGroupIds", ()))
        for spec in config["available_node_types"].values()
    }
    assert len(groups) == 1 and all(group.startswith("sg-") for group in next(iter(groups))), groups


@pytest.mark.parametrize("name", CONFIGS)
def test_no_ray_port_is_open_to_the_internet(name):
    config = validated(load(name))
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    assert world_open_ray_ports(rules) == set()
    # The dashboard and Jobs API listen on the head's loopback only; `ray dashboard` tunnels to it.
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start


def test_port_check_catches_rules_that_open_ray_ports():
    admin_ssh = {
        "IpProtocol": "tcp",
        "FromPort": 22,
        "ToPort": 22,
        "IpRanges": [{"CidrIp": "203.0.113.0/24"}],
    }
    world_ssh = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    within_group = {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-0123"}]}
    dashboard = {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    port_range = {"IpProtocol": "tcp", "FromPort": 6000, "ToPort": 7000, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}
    everything = {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    assert world_open_ray_ports([admin_ssh, world_ssh, within_group]) == set()
    assert world_open_ray_ports([dashboard]) == {8265}
    assert world_open_ray_ports([port_range]) == {6379}
    assert world_open_ray_ports([everything]) == set(RAY_PORTS)

    # The same check on a copy of gpu.yaml that asks Ray for a group opening the dashboard.
    broken = load("gpu")
    broken["provider"]["security_group"] = {"GroupName": "runjobs-open", "IpPermissions": [dashboard]}
    rules = validated(broken)["provider"]["security_group"]["IpPermissions"]
    assert world_open_ray_ports(rules) == {8265}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_starts_ray_with_token_authentication(name):
    config = validated(load(name))
    starts = ray_start_commands(config)
    assert len(starts) == 2  # the head's and the workers'
    for command in starts:
        assert "RAY_AUTH_MODE=token" in shlex.split(command), command
    # The token `ray get-auth-token --generate` writes on the launching machine goes to every node.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("export RAY_AUTH_MODE=token" in command for command in config["initialization_commands"])


@pytest.mark.parametrize("name", CONFIGS)
def test_setup_installs_runjobs_from_the_checkout(name):
    config = load(name)
    _, editables = pip_installs(config["setup_commands"])
    assert editables == ["~/runjobs"]
    mounts = {
        remote: local for remote, local in config["file_mounts"].items() if remote.startswith("~/runjobs/")
    }
    # Everything pip needs to install runjobs from ~/runjobs, each from a path that exists here.
    wanted = {"pyproject.toml", "README.md", "jobs", "workers"}
    assert wanted <= {remote.removeprefix("~/runjobs/") for remote in mounts}
    for remote, local in mounts.items():
        assert remote == f"~/runjobs/{local}"
        assert (REPOSITORY / local).exists(), local


@pytest.mark.parametrize("name", CONFIGS)
def test_setup_installs_cuda_builds_of_both_frameworks_within_pyprojects_bounds(name):
    commands = load(name)["setup_commands"]
    requirements, _ = pip_installs(commands)
    tensorflow, torch, ray = requirements["tensorflow"], requirements["torch"], requirements["ray"]
    assert "and-cuda" in tensorflow.extras
    assert tensorflow.specifier == runjobs_requirement("tensorflow").specifier
    # PyPI's default Linux torch wheel is the CUDA build; a +cpu version or the CPU index is not.
    assert torch.specifier == runjobs_requirement("torch").specifier
    assert "+cpu" not in str(torch.specifier)
    assert not any("whl/cpu" in command for command in commands)
    # Ray is pinned to one release, inside pyproject's bounds, with the dashboard and Jobs API.
    (pin,) = list(ray.specifier)
    assert pin.operator == "==" and pin.version in runjobs_requirement("ray").specifier
    assert "default" in ray.extras


def test_both_configs_set_nodes_up_the_same_way():
    gpu, local = load("gpu"), load("local")
    for key in ("setup_commands", "initialization_commands", "file_mounts", "rsync_exclude"):
        assert gpu[key] == local[key], key
