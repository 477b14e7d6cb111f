"""The README's two set-up commands are the ones CI and users run."""
import pathlib
import re

from script_modules import load_script

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


def test_generated_tables_agree_with_the_committed_files():
    """README.md's and docs/performance-history.md's tables are what scripts/readme_tables.py
    writes from the committed results today."""
    tables = load_script("scripts/readme_tables.py")
    for path, blocks in tables.BLOCKS.items():
        text = (ROOT / path).read_text()
        assert tables.render(text, blocks, path) == text, f"{path} is stale: run python scripts/readme_tables.py"


def test_the_readme_check_fails_on_an_edited_number(tmp_path, monkeypatch):
    """The check has teeth: a number typed over in a generated block is caught."""
    tables = load_script("scripts/readme_tables.py")
    text = (ROOT / "README.md").read_text()
    begin = text.index("<!-- BEGIN generated: digits -->")
    edited = text[:begin] + text[begin:].replace("%", "1%", 1)
    assert tables.render(edited, tables.BLOCKS["README.md"], "README.md") != edited


def test_docs_name_only_files_that_exist():
    """Every repository path quoted in README.md and docs/ (`path/to/file.ext`) exists."""
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path in re.findall(r"`((?:csrc|npid_kernels|scripts|tests|benchmarks|experiments|results|docs)/[\w./-]+\.\w+)`",
                               doc.read_text()):
            if not (ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
    assert not missing, missing
