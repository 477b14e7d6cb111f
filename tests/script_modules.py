"""Loads a repository script (scripts/, experiments/) as a module, so tests call its functions
without the script being an installed package."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative_path: str):
    """The module at ROOT/relative_path, executed afresh (its name is the file's stem)."""
    path = os.path.join(ROOT, relative_path)
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
