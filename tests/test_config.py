
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli
from fluxworker.config import ConfigError, load_config, parse_config


def test_shipped_config_is_valid_and_documents_every_key():
    config = load_config(ROOT / "config.yaml")
    assert config.paths.inbox == (ROOT / "inbox").resolve()
    assert config.paths.outputs == (ROOT / "outputs").resolve()
    shipped = yaml.safe_load((ROOT / "config.yaml").read_text())
    for section, values in config.dump().items():
        assert set(shipped[section]) == set(values), f"{section}: keys missing from config.yaml"
    lines = (ROOT / "config.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue  # blank, comment, or a section header
        assert lines[number - 1].strip().startswith("#"), f"line {number + 1} has no comment: {line!r}"


def test_defaults_fill_an_empty_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("")
    config = load_config(path)
    assert config.paths.inbox == tmp_path / "inbox"
    assert config.limits.max_width == 2048
    assert config.inbox.scan_interval == 2.0


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "config.yaml"
    path.write_text("paths:\n  inbox: ../drop\n  outputs: out\nmodels:\n  flux: ./models/flux\n")
    monkeypatch.chdir("/")
    config = load_config(path)
    assert config.paths.inbox == tmp_path / "drop"
    assert config.paths.outputs == tmp_path / "sub" / "out"
    assert config.models.flux == str(tmp_path / "sub" / "models" / "flux")


def test_hub_id_is_kept_as_a_hub_id(tmp_path):
    config = parse_config({"models": {"flux": "black-forest-labs/FLUX.1-schnell"}}, tmp_path)
    assert config.models.flux == "black-forest-labs/FLUX.1-schnell"


@pytest.mark.parametrize(
    "data, key, fragment",
    [
        ({"paths": {"inboxx": "x"}}, "paths.inboxx", "unknown key (got 'x')"),
        ({"nonsense": 1}, "nonsense", "unknown key (got 1)"),
        ({"http": {"api_kee": "s3cret"}}, "http.api_kee", "unknown key (the value is not shown"),
        ({"limits": {"max_width": 100}}, "limits.max_width", "got 100"),
        ({"limits": {"max_width": "big"}}, "limits.max_width", "got 'big'"),
        ({"models": {"device": "tpu"}}, "models.device", "got 'tpu'"),
        ({"inbox": {"scan_interval": 0}}, "inbox.scan_interval", "got 0"),
        ({"worker": {"log_level": "LOUD"}}, "worker.log_level", "got 'LOUD'"),
        ({"mqtt": {"protocol": "v4"}}, "mqtt.protocol", "got 'v4'"),
        ({"mqtt": {"topic_prefix": "studio/#"}}, "mqtt.topic_prefix", "got 'studio/#'"),
        ({"mqtt": {"worker_id": "gpu 2"}}, "mqtt.worker_id", "got 'gpu 2'"),
        ({"mqtt": {"public_base_url": "studio.lan"}}, "mqtt.public_base_url", "got 'studio.lan'"),
        ({"mqtt": {"reconnect_min_delay": 5, "reconnect_max_delay": 2}}, "mqtt.reconnect_max_delay", "got 2"),
        ({"mqtt": {"hass_job": {"width": 100}}}, "mqtt.hass_job", "multiple of 64"),
        ({"mqtt": {"hass_job": {"id": "fixed"}}}, "mqtt.hass_job", "cannot carry an id"),
    ],
)
def test_bad_values_name_the_key_path_and_the_value(tmp_path, data, key, fragment):
    with pytest.raises(ConfigError) as caught:
        parse_config(data, tmp_path, "cfg.yaml")
    line = next(line for line in str(caught.value).splitlines() if line.strip().startswith(key + ":"))
    assert fragment in line


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        parse_config(["a"], tmp_path)


def test_config_path_precedence_flag_then_environment_then_cwd(tmp_path, tiny_dir):
    for name in ("flag", "env", "cwd"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(f"paths:\n  inbox: inbox-{name}\n")
    env = {"FLUXWORKER_CONFIG": str(tmp_path / "env" / "config.yaml"), "PATH": "/usr/bin:/bin"}
    cwd = tmp_path / "cwd"
    flag = run_cli("check-config", "--config", str(tmp_path / "flag" / "config.yaml"), cwd=cwd, env=env)
    assert "inbox-flag" in flag.stdout, flag.stderr
    from_env = run_cli("check-config", cwd=cwd, env=env)
    assert "inbox-env" in from_env.stdout, from_env.stderr
    from_cwd = run_cli("check-config", cwd=cwd, env={"PATH": "/usr/bin:/bin"})
    assert "inbox-cwd" in from_cwd.stdout, from_cwd.stderr


def test_check_config_prints_the_effective_config(config_file):
    result = run_cli("check-config", "--config", str(config_file))
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["paths"]["inbox"] == str(config_file.parent / "inbox")
    assert printed["limits"]["max_prompt_length"] == 2000


def test_check_config_fails_with_the_key_named(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("worker:\n  stop_timeout: -5\n")
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "worker.stop_timeout" in result.stderr and "-5" in result.stderr


def test_a_secret_is_never_printed(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("http:\n  api_key: s3cr3t\n")  # too short: the error names the key, not the value
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2 and "http.api_key" in result.stderr
    assert "s3cr3t" not in result.stdout + result.stderr


def test_check_config_warns_about_model_files_this_machine_lacks(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("models:\n  flux: ./no-such-model\n  lama: weights/big-lama.pt\n  esrgan: null\n")
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr  # the worker starts; those engines fail their jobs
    assert f"models.flux: {tmp_path / 'no-such-model'}: not a diffusers model folder" in result.stderr
    assert f"models.lama: {tmp_path / 'weights' / 'big-lama.pt'}: file not found" in result.stderr
    assert "models.esrgan" not in result.stderr  # off, not missing


def test_the_build_tools_compilation_needs_are_looked_for_on_the_path(tmp_path, monkeypatch):
    from fluxworker.preflight import missing_build_tools

    import sysconfig

    headers = [] if Path(sysconfig.get_paths()["include"], "Python.h").is_file() else ["Python's headers (Python.h)"]
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # a folder with no compiler in it
    assert missing_build_tools() == ["a C compiler (cc, gcc or clang)"] + headers
    compiler = tmp_path / "my-cc"
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", "my-cc")
    assert missing_build_tools() == headers


def test_check_config_and_the_worker_refuse_what_the_worker_cannot_start_with(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("mqtt:\n  enabled: true\n  tls: true\n  ca_file: certs/ca.pem\n")
    check = run_cli("check-config", "--config", str(path))
    assert check.returncode == 1
    assert f"error: mqtt.ca_file: file not found (got {str(tmp_path / 'certs' / 'ca.pem')!r})" in check.stderr
    worker = run_cli("worker", "--config", str(path))
    assert worker.returncode == 2
    assert "cannot start: mqtt.ca_file" in worker.stderr and "Traceback" not in worker.stderr


def test_missing_config_file_is_a_clear_error(tmp_path):
    result = run_cli("check-config", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "config file not found" in result.stderr


def test_invalid_yaml_is_reported(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("paths: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_weight_files_resolve_against_the_config_folder_and_may_be_null(tmp_path):
    config = parse_config({"models": {"esrgan": "weights/x4.pth", "lama": None}}, tmp_path)
    assert config.models.esrgan == tmp_path / "weights" / "x4.pth"
    assert config.models.lama is None
    assert parse_config({}, tmp_path).models.esrgan is None


@pytest.mark.parametrize(
    "data, key",
    [
        ({"models": {"lama": ""}}, "models.lama"),
        ({"models": {"esrgan": 4}}, "models.esrgan"),
        ({"models": {"unload_after": -1}}, "models.unload_after"),
        ({"upscale": {"tile_size": 8}}, "upscale.tile_size"),
        ({"upscale": {"tile_overlap": -1}}, "upscale.tile_overlap"),
        ({"erase": {"max_side": 10}}, "erase.max_side"),
        ({"limits": {"max_upscale_pixels": 0}}, "limits.max_upscale_pixels"),
    ],
)
def test_bad_engine_settings_name_their_key(tmp_path, data, key):
    with pytest.raises(ConfigError) as caught:
        parse_config(data, tmp_path, "cfg.yaml")
    assert any(line.strip().startswith(key + ":") for line in str(caught.value).splitlines()), str(caught.value)


def test_performance_defaults_keep_the_unmeasured_options_off(tmp_path):
    performance = parse_config({}, tmp_path).performance
    assert performance.start_mode == "balanced" and performance.balanced_vram_gib == 15.0
    assert performance.compile == "auto" and not performance.fp8_storage
    # compilation measured faster on a GPU in both modes, so auto turns it on with CUDA only
    assert performance.compiles("cuda") and not performance.compiles("cpu")
    assert performance.warmup == "auto"  # on with CUDA only: the CPU demo and tests start at once
    assert performance.sizes == [(1024, 1024), (512, 512)]


@pytest.mark.parametrize("compile_, fp8, cuda, cpu", [
    ("auto", True, False, False),  # auto gives way to float8 storage, which compiled blocks cannot trace
    (True, False, True, True),
    (False, False, False, False),
])
def test_compile_setting_on_each_device(tmp_path, compile_, fp8, cuda, cpu):
    performance = parse_config({"performance": {"compile": compile_, "fp8_storage": fp8}}, tmp_path).performance
    assert (performance.compiles("cuda"), performance.compiles("cpu")) == (cuda, cpu)


def test_compile_cache_resolves_against_the_config_folder(tmp_path):
    config = parse_config({"performance": {"compile_cache": "cache/inductor"}}, tmp_path)
    assert config.performance.compile_cache == tmp_path / "cache" / "inductor"


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"warmup_sizes": ["1024"]}, "'1024' is not WIDTHxHEIGHT"),
        ({"warmup_sizes": ["1000x1000"]}, "multiples of 64"),
        ({"balanced_vram_gib": 4, "balanced_reserve_gib": 4.0}, "must be less than balanced_vram_gib"),
        ({"compile": True, "fp8_storage": True}, "cannot both be on"),
        ({"attention": "xformers"}, "got 'xformers'"),
        ({"start_mode": "turbo"}, "got 'turbo'"),
        ({"balanced_vram_gib": 0}, "got 0"),
        ({"prompt_cache": -1}, "got -1"),
    ],
)
def test_bad_performance_settings_name_their_key(tmp_path, values, fragment):
    with pytest.raises(ConfigError) as caught:
        parse_config({"performance": values}, tmp_path, "cfg.yaml")
    lines = [line for line in str(caught.value).splitlines() if line.strip().startswith("performance")]
    assert lines and any(fragment in line for line in lines), str(caught.value)
