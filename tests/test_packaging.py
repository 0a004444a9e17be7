"""Layout promises: kernels/ and export/ import as lvmae_fast.kernels / lvmae_fast.export, never as
generic top-level modules in site-packages, and the top-level folders don't break other packages."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_setup_maps_kernels_and_export_inside_the_package():
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    package_dir = ast.literal_eval(kw["package_dir"])
    assert package_dir["lvmae_fast.kernels"] == "kernels" and package_dir["lvmae_fast.export"] == "export"
    assert "kernels" not in package_dir and "export" not in package_dir


def test_checkout_imports_without_install():
    # A bare checkout on PYTHONPATH (no pip install) resolves the mapped subpackages too.
    code = "import lvmae_fast.kernels as k, lvmae_fast.export as e; print(k.__file__); print(e.__file__)"
    out = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[:0] = {[str(ROOT)] + sys.path!r}; {code}"],
                         capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(ROOT / "kernels" / "__init__.py"), str(ROOT / "export" / "__init__.py")]


def test_importing_the_library_leaves_triton_unimported():
    """Triton fixes interpreter vs compiled mode at its first import: a module that imports it (or
    dynamo, which does) at import time would fix compiled mode before TRITON_INTERPRET=1 can be set,
    and the CPU suite's ~110 interpreter tests of the kernels would skip (as they did for one commit,
    through a torch.compiler.disable decorator)."""
    code = ("import sys, lvmae_fast, lvmae_fast.attention, lvmae_fast.model, lvmae_fast.graphs, lvmae_fast.train, "
            "lvmae_fast.extract, lvmae_fast.kernels; print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]"]


def test_top_level_kernels_folder_is_importable_by_name():
    # transformers imports any importable `kernels` while probing for the PyPI package of that name;
    # with the repo root on sys.path (python -m ...) that finds our folder, which must import cleanly.
    out = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__name__)"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_readme_python_api_snippet_runs(tmp_path, monkeypatch):
    """The README's Python API example is complete and runs as written (in an empty folder)."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
