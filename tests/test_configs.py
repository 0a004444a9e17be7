"""Shipped YAML presets (lvmae_fast/configs/*.yaml): equal to the resolved presets, usable via --config."""
import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def test_printed_config_spells_out_the_model_and_reads_back_as_the_preset(capsys):
    """--print-config (and the shipped files) showed `model: {}`: the widths, depths and masking a user
    would edit were nowhere. Now every model setting is written; values equal to the preset's read back
    as no override, so the file is the preset's config (equal, and resumable as the preset)."""
    from lvmae_fast.model import LVMAEConfig

    printed = yaml.safe_load(print_config(capsys, "--preset", "paper"))
    paper = LVMAEConfig.from_preset("paper", in_dim=1).to_dict()
    assert printed["model"] == {k: v for k, v in paper.items() if k != "in_dim"}
    assert tc.resolve([("file", printed)]).model == {}
    edited = {**printed, "model": {**printed["model"], "depth": 24, "masking": "random"}}
    assert tc.resolve([("file", edited)]).model == {"depth": 24, "masking": "random"}
    assert yaml.safe_load(print_config(capsys, "--preset", "paper", "--set", "model.depth=24"))["model"]["depth"] == 24


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


# ---- user mistakes in configs and flags: one line naming the key, exit 1, no traceback -------------------------
def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *expected: str) -> None:
    assert code == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], err
    for text in expected:
        assert text in lines[0], err


@pytest.mark.parametrize("item, message", [
    ("model.mask_ratio=abc", "model.mask_ratio: expected float, got 'abc'"),   # was a TypeError traceback
    ("model.mask_ratio=", "model.mask_ratio: expected float, got None"),
    ("model.mask_ratio=0", "model.mask_ratio=0.0 must be in (0, 1)"),          # trained on a loss of 0
    ("model.mask_ratio=1e-17", "model.mask_ratio=1e-17 must be in (0, 1)"),    # 1 - ratio == 1: as 0
    ("model.depth=2.5", "model.depth: expected int, got 2.5"),
    ("model.mlp_ratio=0", "mlp_ratio=0.0 must be finite and give MLP widths >= 1"),  # was an MLP-less model
    ("model.mlp_ratio=-1", "mlp_ratio=-1.0 must be finite"),                   # was a RuntimeError traceback
    ("model.nope=1", "model: unknown keys ['nope']"),
    ("model.embed_dim=-4", "embed_dim=-4 must be >= 1"),                      # was named as an mlp_ratio error
    ("model.decoder_embed_dim=0", "decoder_embed_dim=0 must be >= 1"),
    ("model.max_len=1000000000000", "max_len=1000000000000 is beyond 4194304 segments"),  # was an allocation traceback
    ("epochs=.inf", "config key epochs: expected int, got inf"),               # was an OverflowError traceback
    ("weight_decay=-1", "weight_decay=-1.0 must be >= 0"),                     # was accepted
    ("min_lr=-1e-4", "min_lr=-0.0001 must be >= 0"),                           # was accepted: lr < 0 at the end
    ("grad_clip=-1", "grad_clip=-1.0 must be >= 0"),                           # was accepted
    ("blr=-1", "blr=-1.0 must be >= 0"),                                       # was torch's "Invalid learning rate"
    ("blr=inf", "blr=inf must be a finite number"),                            # was a run stopped at step 1
    ("lr=nan", "lr=nan must be a finite number"),
    ("beta2=1.0", "beta2=1.0 must be in [0, 1)"),
    ("cpu_threads=-2", "cpu_threads=-2 must be >= 0"),                         # was a RuntimeError traceback
    ("num_workers=-1", "num_workers=-1 must be >= 0"),                         # was refused after writing RUN
    ("prefetch_factor=0", "prefetch_factor=0 must be >= 1"),
    ("max_len=1", "max_len=1: a crop needs >= 2 segments"),                    # was a loss of 0 at every step
    ("device=meta", "device='meta' must be auto, cpu, cuda or cuda:N"),        # was a traceback mid-run
    ("device=mps", "device='mps' must be auto, cpu, cuda or cuda:N"),
    # The sampler's own checks: --print-config accepted these, a run refused them.
    ("short_video_policy=foo", "short_video_policy='foo' is not one of"),
    ("batch_videos=0", "max_len and batch_videos must be >= 1"),
    ("duration_min=900", "need 0 < duration_min <= duration_max"),
    ("max_tokens=3", "max_tokens=3 must be >= max_len"),
])
def test_bad_config_values_are_one_line_errors_naming_the_key(item, message, capsys):
    code, _, err = run_cli(capsys, "pretrain", "--preset", "tiny", "--set", item, "--print-config")
    assert_one_line_error(code, err, "lvmae pretrain: error:", message)


def test_valid_edge_values_still_resolve():
    cfg = tc.resolve([("t", {"preset": "tiny", "epochs": "1e3", "device": "cuda:1", "model": {"mask_ratio": 0.9}}),
                      ("--set", tc.parse_set(["cpu_threads=0", "min_lr=0", "model.depth=3"]))])
    assert (cfg.epochs, cfg.device, cfg.cpu_threads) == (1000, "cuda:1", 0)  # YAML 1.1 reads 1e3 as a string
    assert cfg.model == {"mask_ratio": 0.9, "depth": 3} and type(cfg.model["depth"]) is int


@pytest.mark.parametrize("content, message", [
    ("epochs: 3\n  bad: : indent\n", "is not valid YAML at line 2, column 6: mapping values are not allowed here"),
    (b"\xff\xfeepochs: 3\n", "is not UTF-8 text"),
    ("- epochs\n- 3\n", "expected a mapping of config keys (key: value lines), got a list"),
    ("epochs: .inf\n", "c.yaml: config key epochs: expected int, got inf"),
    ("device:\n", "c.yaml: config key device: expected str, got None"),    # was the device 'None'
    ("epochs: lots\n", "c.yaml: config key epochs: expected int, got 'lots'"),  # names the file
])
def test_broken_config_files_are_one_line_errors(content, message, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = run_cli(capsys, "pretrain", "--config", path, "--print-config")
    assert_one_line_error(code, err, message)


def test_config_file_edge_cases(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    assert tc.load_yaml(tmp_path / "empty.yaml") == {}
    (tmp_path / "blank.yaml").write_text("store:\nout:\nepochs: 30\n")  # empty store/out: not set, not 'None'
    cfg = tc.resolve([("blank.yaml", tc.load_yaml(tmp_path / "blank.yaml"))])
    assert (cfg.store, cfg.out, cfg.epochs) == ("", "", 30)
    code, _, err = run_cli(capsys, "pretrain", "--config", tmp_path, "--print-config")
    assert_one_line_error(code, err, f"config file {tmp_path} is a directory")


# ---- store CLI ---------------------------------------------------------------------------------------------------
@pytest.fixture
def npy_dir(tmp_path):
    src = tmp_path / "npys"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        np.save(src / f"v{i}.npy", rng.standard_normal((5 + i, 8)).astype(np.float32 if i % 2 else np.float16))
    return src


def test_store_import_settings_and_out_errors_are_reported_once(npy_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    cases = [
        (["--out", tmp_path / "afile"], "is a file, not a directory"),           # was one failure line per video
        (["--out", tmp_path / "foreign"], "is not an embedding store and not empty"),
        (["--out", tmp_path / "s1", "--segment-seconds", "0"], "--segment-seconds must be a finite number of seconds >= 0.001"),
        (["--out", tmp_path / "s2", "--segment-seconds", "nan"], "--segment-seconds must be a finite number of seconds"),
        # every window time read 0.0 in float32
        (["--out", tmp_path / "s4", "--segment-seconds", "1e-300"], "--segment-seconds must be a finite number of seconds"),
        (["--out", tmp_path / "s3", "--shard-rows", "0"], "--shard-rows must be >= 1, got 0"),  # 0 was the default
    ]
    for args, message in cases:
        code, out, err = run_cli(capsys, "store", "import", npy_dir, *args)
        assert_one_line_error(code, err, "lvmae store import: error:", message)
        assert "imported" not in out
    assert not any((tmp_path / s).exists() for s in ("s1", "s2", "s3"))
    assert sorted(p.name for p in (tmp_path / "foreign").iterdir()) == ["notes.txt"]


def test_store_import_of_an_empty_csv_says_so(tmp_path, capsys):
    for name, text in (("empty.csv", ""), ("header.csv", "video_id,segment_paths\n")):
        (tmp_path / name).write_text(text)
        code, _, err = run_cli(capsys, "store", "import", tmp_path / name, "--out", tmp_path / "s")
        assert_one_line_error(code, err, "holds no video rows")  # not "holds no <video_id>.npy/.pt files"


def test_store_verify_quotes_ids_with_spaces(tmp_path, capsys):
    import json

    from lvmae_fast.store import StoreWriter

    with StoreWriter(tmp_path / "s", 4) as w:
        for vid in ("my clip", "two\nlines", "plain"):
            w.add(vid, np.ones((3, 4), np.float32))
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    emb = np.load(tmp_path / "s" / index["shards"][0]["emb"], mmap_mode="r+")
    emb[:, 0] = np.nan  # every video bad
    emb.flush()
    code, out, _ = run_cli(capsys, "store", "verify", tmp_path / "s")
    assert code == 2
    assert out.splitlines()[-1].endswith('bad videos (3): "my clip" plain "two\\nlines"')


def test_an_empty_input_is_refused_not_read_as_the_current_folder(tmp_path, capsys, npy_dir, monkeypatch):
    """`lvmae extract "$UNSET" ...`: Path("") is ".", so every video below the current folder was
    extracted (and every array below it imported)."""
    monkeypatch.chdir(npy_dir)   # a folder holding importable arrays: an empty source would import them
    code, _, err = run_cli(capsys, "store", "import", "", "--out", tmp_path / "s")
    assert_one_line_error(code, err, "lvmae store import: error:", "empty string (an unset shell variable?)")
    code, _, err = run_cli(capsys, "extract", "", "--encoder", "tiny", "--out", tmp_path / "e", "--no-progress")
    assert_one_line_error(code, err, "lvmae extract: error:", "empty string (an unset shell variable?)")
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()


def test_store_compact_refuses_zero_shard_rows(tmp_path, capsys, npy_dir):
    assert run_cli(capsys, "store", "import", npy_dir, "--out", tmp_path / "s")[0] == 0
    code, _, err = run_cli(capsys, "store", "compact", tmp_path / "s", "--shard-rows", "0")
    assert_one_line_error(code, err, "lvmae store compact: error: --shard-rows must be >= 1")


def test_os_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from lvmae_fast import store_cli

    def broken_disk(args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_cli, "_run_info", broken_disk)
    code, _, err = run_cli(capsys, "store", "info", tmp_path)
    assert_one_line_error(code, err, "lvmae store info: error: [Errno 5] Input/output error")


# ---- demo arguments ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--videos", "0"], "--videos must be >= 1, got 0"),     # 0 silently meant the default 512
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),     # 0 silently meant the default 60
    (["--epochs", "-1"], "--epochs must be >= 1, got -1"),   # was refused after writing the data
    (["--dim", "0"], "--dim must be >= 1, got 0"),
    (["--source", "videos", "--duration", "0"], "--duration must be a number of seconds >= 7.5"),  # was a traceback
    (["--source", "videos", "--duration", "5"], "--duration must be a number of seconds >= 7.5"),  # one window:
    # pretraining left every 1-window video out, after extracting them all
    (["--source", "videos", "--duration", "inf"], "--duration must be a number of seconds >= 7.5"),  # hung
    (["--seed", "-1"], "--seed must be >= 0, got -1"),       # numpy's error, after --overwrite had deleted
    # each source's own flag, given to the other: was silently ignored
    (["--source", "videos", "--dim", "128"], "--dim applies to --source embeddings only"),
    (["--duration", "30"], "--duration applies to --source videos only"),
])
def test_demo_refuses_bad_numbers_before_writing_anything(args, message, tmp_path, capsys):
    code, _, err = run_cli(capsys, "demo", "--source", "embeddings", *args, "--out", tmp_path / "demo", "--no-progress")
    assert_one_line_error(code, err, "lvmae demo: error:", message)
    assert not (tmp_path / "demo").exists()


def test_verbose_turns_on_our_debug_lines_only(tmp_path):
    """-v set the root logger to DEBUG: a tiny demo printed ~2000 lines of matplotlib's font search."""
    script = ("import logging, sys\nfrom lvmae_fast.cli import main\nrc = main(sys.argv[1:])\n"
              "print('debug on:', logging.getLogger('lvmae_fast.train').isEnabledFor(logging.DEBUG))\n"
              "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", script, "-v", "demo", "--source", "embeddings", "--videos", "4",
                          "--dim", "8", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "demo")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "debug on: True" in out.stdout and (tmp_path / "demo" / "run" / "loss.png").is_file()  # matplotlib ran
    assert [line for line in out.stderr.splitlines() if "DEBUG" in line and "lvmae_fast" not in line] == []


def test_no_command_is_a_usage_error_on_stderr():
    out = subprocess.run([sys.executable, "-m", "lvmae_fast"], capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (2, "")  # was the help on stdout: a pipe read it as output
    assert out.stderr.startswith("usage: lvmae") and "convert-reference" in out.stderr


def test_demo_out_naming_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, _, err = run_cli(capsys, "demo", "--source", "embeddings", "--out", tmp_path / "f", "--no-progress")
    assert_one_line_error(code, err, "is a file")


def test_config_file_keys_given_twice_or_dotted_are_named(tmp_path, capsys):
    (tmp_path / "dup.yaml").write_text("epochs: 30\nseed: 1\nepochs: 50\n")  # YAML alone keeps 50 silently
    code, _, err = run_cli(capsys, "pretrain", "--config", tmp_path / "dup.yaml", "--print-config")
    assert_one_line_error(code, err, "at line 3, column 1: key 'epochs' is given twice")
    (tmp_path / "dotted.yaml").write_text("model.mask_ratio: 0.3\n")  # the --set spelling, in a file
    code, _, err = run_cli(capsys, "pretrain", "--config", tmp_path / "dotted.yaml", "--print-config")
    assert_one_line_error(code, err, "unknown config keys ['model.mask_ratio']", "go under `model:`")
    for text, line in (("[lr, blr]: 0.1\n", 1), ("model:\n  {a: 1}: 2\n", 2)):  # was a TypeError traceback
        (tmp_path / "unhashable.yaml").write_text(text)
        code, _, err = run_cli(capsys, "pretrain", "--config", tmp_path / "unhashable.yaml", "--print-config")
        assert_one_line_error(code, err, f"at line {line}", "found unhashable key")


def test_config_files_stack_and_take_yaml_merge_keys(tmp_path, capsys):
    """A second --config replaced the first silently (epochs: 3 dropped); a merge key `<<:` (which
    yaml.safe_load reads) was refused as 'not valid YAML'. An explicit key overrides a merged one, as in YAML."""
    (tmp_path / "a.yaml").write_text("epochs: 3\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("seed: 5\nmodel:\n  <<: {mask_ratio: 0.3, masking: random}\n  masking: semantic\n")
    code, out, err = run_cli(capsys, "pretrain", "--config", tmp_path / "a.yaml", "--config", tmp_path / "b.yaml",
                             "--print-config")
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert (printed["epochs"], printed["seed"]) == (3, 5)
    assert (printed["model"]["mask_ratio"], printed["model"]["masking"]) == (0.3, "semantic")


def test_store_and_out_expand_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = tc.resolve([("--set", tc.parse_set(["store=~/stores/a", "out=~/runs/b"]))])  # no shell expands these
    assert (cfg.store, cfg.out) == (str(tmp_path / "stores" / "a"), str(tmp_path / "runs" / "b"))


def test_crops_longer_than_the_models_max_len_are_refused_naming_both_keys(tmp_path, capsys):
    """--set max_len=16384 alone (model.max_len stays 8192) was accepted; the run wrote RUN and then stopped
    at the first long crop with "batch holds a sequence of length N > max_len=8192", naming neither key."""
    code, _, err = run_cli(capsys, "pretrain", "--preset", "tiny", "--set", "max_len=16384", "--print-config")
    assert_one_line_error(code, err, "max_len=16384 (segments per crop) exceeds model.max_len=8192",
                          "--set model.max_len=16384")
    code, _, err = run_cli(capsys, "pretrain", "--preset", "tiny", "--set", "max_len=16384", "--store",
                           tmp_path / "store", "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(code, err, "exceeds model.max_len=8192")
    assert not (tmp_path / "run").exists()
    cfg = tc.resolve([("--set", tc.parse_set(["max_len=16384", "model.max_len=16384"]))])  # both raised: fine
    assert (cfg.max_len, cfg.model["max_len"]) == (16384, 16384)
    with pytest.raises(ValueError, match="exceeds model.max_len=100"):
        tc.resolve([("t", {"max_len": 101, "model": {"max_len": 100}})])
    assert tc.resolve([("t", {"max_len": 100, "model": {"max_len": 100}})]).max_len == 100  # equal: fine


@pytest.mark.parametrize("setting, message", [
    ("model.max_len=0", "model.max_len=0 must be >= 1"),
    ("model.masking=foo", "model.masking='foo' is not one of"),
    ("model.num_heads=7", "model.embed_dim/num_heads = 64/7 must divide evenly"),
    ("model.decoder_embed_dim=33,model.decoder_num_heads=3",
     "model: sin-cos positions need even embed_dim and decoder_embed_dim")])
def test_a_model_settings_own_mistake_names_it_as_a_model_key(capsys, setting, message):
    """The model's checks said "config: max_len=0 must be >= 1": max_len is also a top-level key (segments per
    crop), so the message sent users to the wrong setting."""
    sets = [arg for item in setting.split(",") for arg in ("--set", item)]
    code, _, err = run_cli(capsys, "pretrain", "--preset", "tiny", *sets, "--print-config")
    assert_one_line_error(code, err, message)


def test_resume_compares_the_model_it_builds_not_how_its_overrides_spell_it():
    """A checkpoint saved with `model: {depth: 2}` under tiny (its preset value, kept as an override before
    overrides were made canonical) resumes under `model: {}`; train.py refuses a different model config."""
    cfg = tc.resolve([("p", {"preset": "tiny"})])
    assert tc.resume_conflicts({**cfg.to_dict(), "model": {"depth": 2}}, cfg) == []
    assert tc.resume_conflicts({**cfg.to_dict(), "epochs": 7}, cfg) == [f"epochs: checkpoint has 7, now {cfg.epochs!r}"]


@pytest.mark.parametrize("text, number", [("out: 0700", "448"), ("out: 1.10", "1.1"), ("store: 0123", "83")])
def test_a_path_yaml_reads_as_a_number_is_refused_not_renamed(tmp_path, capsys, text, number):
    """`out: 0700` in a config file is octal 448 to YAML 1.1: the run went to ./448 without a word."""
    (tmp_path / "c.yaml").write_text(text + "\n")
    code, _, err = run_cli(capsys, "pretrain", "--config", tmp_path / "c.yaml", "--print-config")
    assert_one_line_error(code, err, f"YAML read this path as the number {number}; quote it")
    quoted = text.replace(": ", ": '") + "'"
    (tmp_path / "c.yaml").write_text(quoted + "\n")
    code, out, _ = run_cli(capsys, "pretrain", "--config", tmp_path / "c.yaml", "--print-config")
    key, value = text.split(": ")
    assert code == 0 and yaml.safe_load(out)[key] == value


def test_set_model_mapping_and_model_keys_combine_in_command_line_order(capsys):
    """`--set model={...}` replaced what earlier `--set model.KEY=...` items gave (mask_ratio dropped
    silently), and a later `model.KEY` item was a TypeError traceback; as layers do, they now merge."""
    both = tc.parse_set(["model={masking: random}", "model.mask_ratio=0.4"])
    assert both == tc.parse_set(["model.mask_ratio=0.4", "model={masking: random}"]) == \
        {"model": {"masking": "random", "mask_ratio": 0.4}}
    assert tc.parse_set(["model.mask_ratio=0.4", "model={mask_ratio: 0.3}"]) == {"model": {"mask_ratio": 0.3}}
    cfg = tc.resolve([("--set", both)])
    assert (cfg.model["masking"], cfg.model["mask_ratio"]) == ("random", 0.4)
    code, _, err = run_cli(capsys, "pretrain", "--preset", "tiny", "--print-config", "--set", "model=3",
                           "--set", "model.mask_ratio=0.4")
    assert_one_line_error(code, err, "--set: config key model: expected dict, got 3")
