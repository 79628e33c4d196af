"""The README's two commands and CI stay in step."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _commands(readme: str) -> list[str]:
    blocks = readme.split("```bash\n")[1:3]
    return [b.split("\n```")[0].strip() for b in blocks]


def test_readme_opens_with_run_and_test_commands():
    readme = (REPO / "README.md").read_text()
    run, test = _commands(readme)
    assert "pip install" in run and run.endswith("kdci-ray quickstart")  # the main job is the quickstart
    assert "pip install" in test and "pytest" in test
    ci = (REPO / ".ci" / "run").read_text()
    assert f"TEST_COMMAND='{test}'" in ci


def test_importing_the_package_and_every_test_module_starts_neither_ray_nor_mlflow():
    """Collection and the Ray-free tests stay cheap: `kdci_ray` (its core, the CLI, tracking's front door)
    and every test module import Ray and MLflow only inside the functions that use them."""
    import json
    import subprocess
    import sys

    modules = sorted(p.stem for p in (REPO / "tests").glob("test_*.py"))
    code = (
        "import json, sys; sys.path.insert(0, 'tests'); import conftest\n"
        "import kdci_ray, kdci_ray.cli, kdci_ray.engine.distill, kdci_ray.synthesis, kdci_ray.kdci, kdci_ray.tracking\n"
        f"for name in {modules!r}: __import__(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    assert len(modules) >= 20  # every module was imported, not an empty glob
