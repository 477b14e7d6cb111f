"""The README's two set-up commands are the ones CI and users run."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = "bash scripts/setup.sh && python3 -m pytest tests -q -ra"
    assert any(test_command in block for block in readme_commands()), "README lost the test command"
    assert test_command in ci, ".ci/run no longer runs the README's test command"


def test_readme_main_job_uses_the_driver_on_the_default_dataset():
    blocks = "\n".join(readme_commands())
    assert "bash scripts/setup.sh && npid-train" in blocks
