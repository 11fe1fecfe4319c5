"""Typed configuration (orchestrator/config.py): per-algorithm option sections, typed sections, migration, help."""
from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest

from fed_fixtures import REPO, tiny_config
from orchestrator.algorithms.ditto import DittoOptions
from orchestrator.config import config_from_dict, parse_args
from orchestrator.errors import ConfigError


def test_algorithm_options_are_typed_sections(tmp_path):
    cfg = tiny_config(tmp_path, "--algorithm.name", "ditto", "--algorithm.ditto.lam", "0.5")
    assert cfg.algorithm_options() == DittoOptions(lam=0.5, reset_personal=False)
    assert isinstance(cfg.algorithm.ditto.lam, float)
    with pytest.raises(ConfigError, match=r"algorithm\.ditto\.lam"):
        tiny_config(tmp_path, "--algorithm.name", "ditto", "--algorithm.ditto.lam", "many")
    # the defaults of an algorithm without its section; a section of another algorithm is a mistake
    assert tiny_config(tmp_path, "--algorithm.name", "perfedavg").algorithm_options().beta == 0.1
    with pytest.raises(ConfigError, match=r"^config key algorithm\.ditto: set, but algorithm\.name is mhmd"):
        tiny_config(tmp_path, "--algorithm.ditto.lam", "0.5")


def test_typed_sections_take_dotted_overrides(tmp_path):
    cfg = tiny_config(tmp_path, "--data.synthetic.num_classes", "5", "--algorithm.loss_options.kd_weight", "2",
                      "--flower.num_cpus", "2")
    assert cfg.data.synthetic.num_classes == 5 and cfg.synthetic_options()["train_per_class"] == 100
    assert cfg.loss_options() == {"kd_weight": 2.0}
    assert cfg.flower.num_cpus == 2.0
    with pytest.raises(ConfigError, match=r"config key data\.synthetic\.num_classez: unknown key"):
        tiny_config(tmp_path, "--data.synthetic", "{num_classez: 3}")
    with pytest.raises(ConfigError, match=r"flower\.num_cpus"):
        tiny_config(tmp_path, "--flower.num_cpus", "two")
    with pytest.raises(ConfigError, match=r"^config key flower\.num_gpus: must be a number >= 0"):
        tiny_config(tmp_path, "--flower.num_gpus", "-1")
    with pytest.raises(ConfigError, match=r"^config key algorithm\.loss_options: loss\.kd_weight must be >= 0"):
        tiny_config(tmp_path, "--algorithm.loss_options.kd_weight", "-1")


def test_no_abbreviated_keys(tmp_path):
    with pytest.raises(ConfigError, match="unrecognized arguments: --data.num_client"):
        tiny_config(tmp_path, "--data.num_client", "5")


def test_resolved_config_round_trips_and_old_options_are_migrated(tmp_path):
    cfg = tiny_config(tmp_path, "--algorithm.name", "fedrep", "--algorithm.fedrep.head_epochs", "2")
    data = cfg.to_dict()
    assert "fedrep" in data["algorithm"] and "ditto" not in data["algorithm"]  # only the selected section
    assert config_from_dict(data).to_dict() == data
    old = {**data, "algorithm": {"name": "fedrep", "options": {"head_epochs": 3}}}  # before typed options
    assert config_from_dict(old).algorithm.fedrep.head_epochs == 3


def test_help_lists_every_algorithm_option():
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(["--help"])
    text = out.getvalue()
    for key in ("--algorithm.ditto.lam", "--algorithm.fedrep.head_epochs", "--algorithm.perfedavg.adapt",
                "--algorithm.lg_fedavg.init_from", "--flower.num_cpus", "--data.synthetic.num_classes",
                "--algorithm.loss_options.kd_weight"):
        assert key in text, key
    from orchestrator.algorithms import get_algorithm, list_algorithms

    for name in list_algorithms():  # and every algorithm, one per line, with its description
        assert f"\n  {name}: {get_algorithm(name).description}\n" in text + "\n", name


def test_every_shipped_config_parses():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        cfg = parse_args(["--config", str(path)])[0]
        assert cfg.algorithm.name, path


# -- hardening (issue 15): every key overridable and typed, and bad files named in one line ----------------------------
def test_dotted_overrides_into_dict_keys_are_typed(tmp_path):
    from orchestrator.config import load_config

    cfg = load_config(REPO / "configs" / "smoke.yaml", ["--model.options.width", "8", "--flower.ray_init_args.num_cpus",
                                                        "2", "--data.synthetic.num_classes=5",
                                                        "--algorithm.loss_options.kd_weight", "2"])
    assert cfg.model.options == {"width": 8} and cfg.flower.ray_init_args == {"num_cpus": 2}
    assert cfg.data.synthetic.num_classes == 5 and cfg.algorithm.loss_options.kd_weight == 2.0


def test_print_config_prints_typed_dict_overrides_and_the_validated_config(capsys):
    import yaml

    argv = ["--config", str(REPO / "configs" / "smoke.yaml"), "--model.options.width", "8",
            "--flower.ray_init_args.num_cpus=2", "--federation.rounds", "3", "--print_config"]
    with pytest.raises(SystemExit) as done:
        parse_args(argv)
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["options"] == {"width": 8} and printed["flower"]["ray_init_args"] == {"num_cpus": 2}
    assert printed["federation"]["rounds"] == 3
    assert printed == parse_args([a for a in argv if a != "--print_config"])[0].to_dict()
    with pytest.raises(ConfigError, match="federation.rounds"):  # validated before printing
        parse_args(argv + ["--federation.rounds", "0"])


def test_bad_config_files_and_sections_get_one_line(tmp_path, capsys):
    from orchestrator.main import main

    smoke = str(REPO / "configs" / "smoke.yaml")
    binary = tmp_path / "b.yaml"
    binary.write_bytes(bytes(range(128, 256)))
    cases = {
        "seed: 1\ndata:\n  alpha: 1\n  alpha: 2\n": "key 'alpha' is given twice in one mapping (lines 3 and 4)",
        "federation: 5\n": "config key federation is a section, got 5",
        "data:\n  synthetic: 3\n": "config key data.synthetic is a section",
        "data:\n  synthetic: {foo: 1}\n": "data.synthetic.foo: unknown key",
        "": "is empty",
        "- 1\n- 2\n": "holds a list",
        "5\n": "holds a int",
    }
    for i, (text, needle) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        assert main(["--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (text, err)
    for argv, needle in [(["--config", str(binary)], "is not a text YAML file"),
                         (["--config", smoke, "--federation", "5"], "config key federation is a section, not a value"),
                         (["--config", smoke, "--model.options.widht", "8"], "cnn4 has no option 'widht'"),
                         (["--config", smoke, "--model.options.head_layout", "paper"],
                          "config key model.options.head_layout: must be one of ('fixed', 'historic'), got 'paper'"),
                         (["--config", smoke, "--model.name", "mobilenet", "--model.options", "{head_layout: historic}"],
                          "config key model.options.head_layout: mobilenet has no option 'head_layout'"),
                         (["--config", smoke, "--data.num_client", "5"], "unrecognized arguments: --data.num_client")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (argv, err)
        assert "text" not in needle or str(binary) in err


def test_help_describes_every_key():
    import dataclasses

    from orchestrator.config import config_class
    from orchestrator.fielddocs import undescribed

    def walk(cls):
        missing = [f"{cls.__name__}.{name}" for name in undescribed(cls)]
        for fld in dataclasses.fields(cls):
            hint = __import__("typing").get_type_hints(cls)[fld.name]
            if dataclasses.is_dataclass(hint):
                missing += walk(hint)
        return missing

    cls = config_class()
    sections = {f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default_factory)}
    missing = [m for m in walk(cls) if m.split(".")[-1] not in sections and not m.startswith("AlgorithmConfig.")]
    assert not missing, f"keys without a '#:' description: {missing}"
    text = _help_text()
    assert "Config(seed:" not in text and "seed of the partition" in text and "lambda of the proximal term" in text


def _help_text() -> str:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(["--help"])
    return out.getvalue()
