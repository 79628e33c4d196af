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
