"""Ray job: a Ray Tune sweep of Ray Train distillation trials, tracked in MLflow (parent run + a child per trial).

    python jobs/tune.py --config configs/dfnd-digits-digits_cnn-digits_cnn_small.yaml \
        --space kdci.n=[16,64] --space kdci.alpha=[0.5,1.0] [--search grid|random|optuna] [--samples 1] [--scheduler asha|fifo]
    ray job submit --working-dir . -- python jobs/tune.py --config ... --storage /mnt/efs/kdci/ray --gpus-per-worker 0.25
Submitting the same sweep again (same --name and storage) resumes it: finished trials are kept.
"""

from _common import parser, run


def main() -> dict:
    from kdci_ray.cli import add_sweep_arguments

    p = parser(__doc__.splitlines()[0])
    add_sweep_arguments(p)
    args = p.parse_args()

    from kdci_ray.config import DistillConfig, load_config
    from kdci_ray.distributed.tune import sweep_from_args

    cfg = load_config(args.config, DistillConfig, args.set)
    return sweep_from_args(cfg, args)


if __name__ == "__main__":
    run(main)
