"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema) with what our jobs rely on."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_rays_schema_and_names_every_required_key():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does before launching: raises on a schema violation
    for key in ("cluster_name", "max_workers", "idle_timeout_minutes", "docker", "provider", "auth", "available_node_types",
                "head_node_type", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, key
    import ray

    py = "py311"
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-{py}-gpu"
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no tasks
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert workers and all(w["min_workers"] == 0 for w in workers)  # autoscaling from zero
    setup = " ".join(config["setup_commands"])
    assert "whl/cu128" in setup and "kdci_ray @ git+" in setup and "faiss" not in setup and "KDCI_STORAGE" in setup
    assert "torch.cuda.is_available()" in " ".join(config["worker_setup_commands"])  # a GPU node without CUDA fails setup
    assert "KDCI_EXPECT_AUTOSCALED_GPUS=1 ray start --head" in " ".join(config["head_start_ray_commands"])  # drivers ask for GPUs
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert config["idle_timeout_minutes"] > 0
