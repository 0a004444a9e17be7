"""A plain CPU install without any optional extra: core features work, extra-only features fail with one
line naming the extra to install. Optional packages are hidden with an import blocker in a subprocess."""
import subprocess
import sys
import textwrap

import pytest
import torch

BLOCKED = ["av", "triton", "transformers", "nvidia", "flash_attn", "deepspeed", "onnx", "onnxruntime", "tensorrt"]


@pytest.fixture
def blocked_env(tmp_path, monkeypatch):
    # None in sys.modules is how Python spells "not installed" for import and importlib.util.find_spec alike.
    (tmp_path / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({BLOCKED!r}))\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return tmp_path


def run(*args, cwd):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_blocker_really_hides_the_extras(blocked_env):
    out = run("-c", "import av", cwd=blocked_env)
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr


def test_core_pretraining_works_without_extras(blocked_env):
    out = run("-m", "lvmae_fast", "demo", "--source", "embeddings", "--videos", "40", "--epochs", "3",
              "--out", str(blocked_env / "demo"), "--no-progress", cwd=blocked_env)
    assert out.returncode == 0, out.stderr
    assert (blocked_env / "demo" / "run" / "model.safetensors").is_file()
    code = textwrap.dedent("""
        import torch
        from lvmae_fast import LVMAE, LVMAEConfig
        from lvmae_fast.masking import build_masked_batch
        from lvmae_fast.packing import pack_sequences
        x, cu, l = pack_sequences([torch.randn(6, 8), torch.randn(3, 8)])
        batch = build_masked_batch(x, cu, l, "semantic", 0.5, kernels="auto")   # torch path on CPU
        print(float(LVMAE(LVMAEConfig.from_preset("tiny", in_dim=8))(batch)))
        try:
            build_masked_batch(x, cu, l, "semantic", 0.5, kernels="triton")
        except RuntimeError as err:
            print(err)
    """)
    out = run("-c", code, cwd=blocked_env)
    assert out.returncode == 0, out.stderr
    assert "lvmae_fast[triton]" in out.stdout


@pytest.mark.parametrize("argv, extra", [
    (["demo", "--out", "demo_videos"], "lvmae_fast[video]"),
    (["extract", ".", "--encoder", "tiny", "--out", "store"], "lvmae_fast[video]"),
])
def test_extra_only_features_name_the_extra(blocked_env, argv, extra):
    out = run("-m", "lvmae_fast", *argv, cwd=blocked_env)
    assert out.returncode == 1
    assert extra in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_an_installed_pyav_older_than_the_floor_is_refused_by_name(monkeypatch):
    # pip keeps a PyAV the user already has when it satisfies another package: extract checks the version.
    av = pytest.importorskip("av")
    from lvmae_fast.extract import resolve_decoder
    from lvmae_fast.optional import MissingDependency
    from lvmae_fast.video.decode_pyav import PYAV_MINIMUM

    monkeypatch.setattr(av, "__version__", "16.1.0")
    with pytest.raises(MissingDependency, match=rf"'av' >= {PYAV_MINIMUM}, found 16.1.0 \(.*BT.709"):
        resolve_decoder("pyav", torch.device("cpu"))
    monkeypatch.setattr(av, "__version__", f"{PYAV_MINIMUM}.0.0")
    assert resolve_decoder("pyav", torch.device("cpu")) == "pyav"


def test_the_cli_entry_point_reaches_its_ctrl_c_handling_before_torch_loads(monkeypatch, capsys):
    # Ctrl-C in the first second of `lvmae extract` (torch importing) printed a traceback: the package's
    # __init__ imported the model, and with it torch, before main() could catch anything.
    r = subprocess.run([sys.executable, "-c", "import sys, lvmae_fast.cli; print('torch' in sys.modules)"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    from lvmae_fast import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["extract", "x", "--out", "y"]) == 130
    assert capsys.readouterr().err.strip() == "lvmae: interrupted while starting"
