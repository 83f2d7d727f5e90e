"""A cluster YAML (cluster/aws.yaml, cluster/gcp.yaml) as a config for Ray's fake multi-node autoscaler
(`provider: type: fake_multinode`, started with `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`),
which launches and removes "nodes" as raylets on this host. The node types keep their names, resources and
min/max workers; each GPU becomes one `accelerator`, a custom resource (a GPU that is not there cannot be
scheduled on), so a job asks `parallel.worker_resources={accelerator: 1}` where it would ask for one GPU: the same
request shape. What is changed: the head type takes the fake provider's name, nodes get a small object store, and
the idle timeout is the caller's (short, for a test).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ACCELERATOR = "accelerator"
HEAD = "ray.head.default"  # the fake provider tags its head with this type
OBJECT_STORE = 100 * 2**20  # bytes per fake node (the default, 30% of the host's memory, for each node)


def node_resources(spec: dict[str, Any]) -> dict[str, float]:
    """A YAML node type's resources with its GPUs as accelerators."""
    resources = dict(spec["resources"])
    gpus = resources.pop("GPU", 0)
    return {**resources, **({ACCELERATOR: gpus} if gpus else {})}


def fake_config(path: str | Path, gcs_address: str, idle_timeout_minutes: float) -> dict[str, Any]:
    """The fake autoscaler's config for the cluster YAML at `path`, its nodes joining the head at `gcs_address`."""
    source = yaml.safe_load(Path(path).read_text())
    types = {}
    for name, spec in source["available_node_types"].items():
        types[HEAD if name == source["head_node_type"] else name] = {
            "resources": {**node_resources(spec), "object_store_memory": OBJECT_STORE}, "node_config": {},
            "min_workers": spec.get("min_workers", 0), "max_workers": spec.get("max_workers", 0)}
    return {
        "cluster_name": source["cluster_name"], "max_workers": source["max_workers"],
        "upscaling_speed": source.get("upscaling_speed", 1.0), "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": types, "head_node_type": HEAD, "auth": {}, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }
