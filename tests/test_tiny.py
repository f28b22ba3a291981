"""The tiny models and config written by ``fluxworker tiny-models``."""

import subprocess
import sys

import torch

from fluxworker.config import load_config
from fluxworker.engines.weights import load_model_file


def test_tiny_config_serves_the_tiny_upscaler_and_leaves_lama_unconfigured(tiny_dir):
    config = load_config(tiny_dir / "config.yaml")
    assert config.models.esrgan == tiny_dir / "esrgan.pth"
    assert config.models.lama is None
    assert "models.lama is null" in (tiny_dir / "config.yaml").read_text()


def test_tiny_esrgan_is_a_small_rrdbnet_in_the_real_params_ema_format(tiny_dir):
    path = tiny_dir / "esrgan.pth"
    state = torch.load(path, weights_only=True)["params_ema"]
    assert state["conv_first.weight"].shape == (16, 3, 3, 3)
    assert state["body.0.rdb1.conv1.weight"].shape == (32, 16, 3, 3)
    assert state["body.0.rdb3.conv5.weight"].shape == (16, 16 + 4 * 32, 3, 3)
    assert not any(key.startswith("body.1.") for key in state)
    assert {"conv_body.weight", "conv_up1.weight", "conv_up2.weight", "conv_hr.weight", "conv_last.weight"} <= set(state)
    assert path.stat().st_size < 2_000_000
    model = load_model_file(path, "models.esrgan", purpose="SR", scale=4)
    assert model.tags == ["16nf", "1nb"]


def test_tiny_models_with_lama_writes_and_configures_a_random_lama(tmp_path):
    folder = tmp_path / "models"
    result = subprocess.run([sys.executable, "-m", "fluxworker", "tiny-models", str(folder), "--with-lama"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    config = load_config(folder / "config.yaml")
    assert config.models.lama == folder / "lama.safetensors"
    model = load_model_file(config.models.lama, "models.lama", purpose="Inpainting")
    assert type(model.model).__name__ == "LaMa"
