"""Shipped YAML presets (lvmae_fast/configs/*.yaml): equal to the resolved presets, usable via --config."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lvmae_fast import train_config as tc
from lvmae_fast.cli import build_parser, main
from lvmae_fast.train import config_from_args

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "lvmae_fast" / "configs"


def print_config(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["pretrain", *args, "--print-config"]) == 0
    return capsys.readouterr().out


def test_every_preset_ships_and_nothing_else():
    assert tc.CONFIGS_DIR == CONFIGS
    assert sorted(p.name for p in CONFIGS.iterdir()) == sorted(f"{name}.yaml" for name in tc.PRESETS)


@pytest.mark.parametrize("preset", sorted(tc.PRESETS))
def test_shipped_file_is_the_freshly_resolved_preset(preset, capsys):
    text = (CONFIGS / f"{preset}.yaml").read_text()
    # Byte-for-byte the generator's output: a preset change without regenerating fails here.
    assert text == tc.preset_yaml(preset), f"configs/{preset}.yaml is stale: run `python -m lvmae_fast.train_config`"
    header = [line for line in text.splitlines() if line.startswith("#")]
    body = "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))
    assert text.startswith("".join(line + "\n" for line in header))  # the comments are one header on top
    assert f"lvmae pretrain --config lvmae_fast/configs/{preset}.yaml --store STORE --out RUN" in text
    assert "generated" in text.lower()
    # The body is exactly what `lvmae pretrain --preset X --print-config` prints.
    assert body == print_config(capsys, "--preset", preset)
    values = yaml.safe_load(text)
    assert values["preset"] == preset and values["store"] == "" and values["out"] == ""


@pytest.mark.parametrize("preset", sorted(tc.PRESETS))
def test_loading_the_file_gives_the_preset_config(preset, capsys):
    path = str(CONFIGS / f"{preset}.yaml")
    parser = build_parser()
    from_file = config_from_args(parser.parse_args(["pretrain", "--config", path, "--store", "S", "--out", "R"]))
    from_preset = config_from_args(parser.parse_args(["pretrain", "--preset", preset, "--store", "S", "--out", "R"]))
    assert from_file == from_preset and from_file.preset == preset and from_file.store == "S"
    # Same values *and* types (dataclass == says 40 == 40.0; the printed YAML would still differ).
    typed = lambda cfg: {k: (type(v).__name__, v) for k, v in cfg.to_dict().items()}  # noqa: E731
    assert typed(from_file) == typed(from_preset)
    assert print_config(capsys, "--config", path) == print_config(capsys, "--preset", preset)
    # Overrides still apply over the file (precedence preset < --config < --set < flags).
    over = config_from_args(parser.parse_args(["pretrain", "--config", path, "--set", "epochs=300", "--seed", "7"]))
    assert (over.epochs, over.seed) == (300, 7)


def test_presets_differ_where_they_should():
    paper, tiny = (yaml.safe_load((CONFIGS / f"{p}.yaml").read_text()) for p in ("paper", "tiny"))
    assert (paper["epochs"], paper["warmup_epochs"], paper["max_len"]) == (150, 40, 256)
    assert (tiny["epochs"], tiny["max_len"], tiny["num_workers"]) == (20, 64, 0)


def test_generator_rewrites_the_shipped_files(tmp_path):
    written = tc.write_preset_configs(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in CONFIGS.iterdir())
    for p in written:
        assert p.read_text() == (CONFIGS / p.name).read_text()


def test_setup_installs_the_yaml_files():
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    patterns = ast.literal_eval(kw["package_data"])["lvmae_fast"]
    package_dir = ast.literal_eval(kw["package_dir"])["lvmae_fast"]
    matched = {p.name for pattern in patterns for p in (ROOT / package_dir).glob(pattern)}
    assert matched >= {f"{name}.yaml" for name in tc.PRESETS}


def test_cli_pretrain_with_a_shipped_config_prints_it(tmp_path):
    # Through the real entry point, as the header tells users to run it.
    r = subprocess.run([sys.executable, "-m", "lvmae_fast", "pretrain", "--config", "lvmae_fast/configs/paper.yaml",
                        "--print-config"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == tc.dump_yaml(tc.resolve([("preset", {"preset": "paper"})]))


def test_shipped_configs_load_by_their_readme_path_from_anywhere(tmp_path, monkeypatch):
    import pytest

    from lvmae_fast import train_config as tc

    monkeypatch.chdir(tmp_path)  # not a checkout: the README's relative path does not exist here
    shipped = tc.load_yaml(tc.CONFIGS_DIR / "paper.yaml")
    assert tc.load_yaml("lvmae_fast/configs/paper.yaml") == shipped == tc.load_yaml("paper")
    with pytest.raises(FileNotFoundError, match="shipped presets are in .*paper.yaml"):
        tc.load_yaml("my/own/config.yaml")
