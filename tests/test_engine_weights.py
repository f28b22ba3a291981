"""Loading the eraser's and the upscaler's weight files with spandrel, and the errors for bad ones."""

import os
import pickle
import warnings

import pytest
import torch

from fluxworker.engines.weights import ModelFileError, load_model_file
from fluxworker.tiny import build_esrgan_state_dict, write_random_lama


def load_esrgan(path):
    return load_model_file(path, "models.esrgan", purpose="SR", scale=4)


def load_lama(path):
    return load_model_file(path, "models.lama", purpose="Inpainting")


def assert_names(error, path, key):
    message = str(error.value)
    assert message.startswith(f"{key}: {path}: "), message


@pytest.fixture(scope="module")
def lama_formats(lama_file, tmp_path_factory):
    """The session's LaMa as TorchScript (the format of big-lama.pt) and as safetensors."""
    folder = tmp_path_factory.mktemp("lama-formats")
    return {
        ".pth": lama_file,
        ".pt": write_random_lama(folder / "big-lama.pt"),
        ".safetensors": write_random_lama(folder / "lama.safetensors"),
    }


# -- Real-ESRGAN -------------------------------------------------------------------------------


def test_esrgan_loads_the_params_ema_pth_format(tiny_dir):
    raw = torch.load(tiny_dir / "esrgan.pth", weights_only=True)
    assert set(raw) == {"params_ema"} and "conv_first.weight" in raw["params_ema"]
    model = load_esrgan(tiny_dir / "esrgan.pth")
    assert model.architecture.id == "ESRGAN" and model.scale == 4
    assert next(model.model.parameters()).dtype == torch.float32 and not model.model.training


def test_esrgan_loads_a_safetensors_copy(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "RealESRGAN_x4plus.safetensors"
    save_file(build_esrgan_state_dict(), str(path))
    model = load_esrgan(path)
    assert model.architecture.id == "ESRGAN" and model.scale == 4


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_esrgan_loads_a_torchscript_pt(tiny_dir, tmp_path):
    path = tmp_path / "esrgan.pt"
    model = load_esrgan(tiny_dir / "esrgan.pth").model
    torch.jit.trace(model, torch.rand(1, 3, 16, 16), check_trace=False).save(str(path))
    loaded = load_esrgan(path)
    assert loaded.architecture.id == "ESRGAN" and loaded.scale == 4
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(loaded.model(x), model(x))


# -- LaMa --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_lama_loads_every_format(lama_formats, suffix):
    model = load_lama(lama_formats[suffix])
    assert model.architecture.id == "LaMa" and model.purpose == "Inpainting"


def test_lama_formats_hold_the_same_weights(lama_formats):
    weights = [load_lama(lama_formats[s]).model.state_dict() for s in (".pth", ".pt", ".safetensors")]
    key = "model.model.1.ffc.convl2l.weight"
    assert torch.equal(weights[0][key], weights[1][key]) and torch.equal(weights[0][key], weights[2][key])


class BigLama(torch.nn.Module):
    """LaMa as the exported big-lama checkpoints lay it out: its generator under ``generator``."""

    def __init__(self, generator):
        super().__init__()
        self.generator = generator

    def forward(self, image, mask):
        masked = image * (1 - mask)
        return mask * self.generator(masked, mask) + (1 - mask) * image


def stored_keys(path):
    """The names of the weights as the file holds them."""
    if path.suffix == ".pt":
        return list(torch.jit.load(str(path)).state_dict())
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return list(handle.keys())
    return list(torch.load(path, weights_only=True))


@pytest.fixture(scope="module")
def generator_formats(lama_file, tmp_path_factory):
    """The session's LaMa with every key under ``generator.`` instead of ``model.``."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("lama-generator")
    state = torch.load(lama_file, weights_only=True)
    assert all(key.startswith("model.model.") for key in state)
    state = {"generator." + key[len("model."):]: value for key, value in state.items()}
    torch.save(state, folder / "big-lama.pth")
    save_file({key: value.contiguous() for key, value in state.items()}, str(folder / "big-lama.safetensors"))
    wrapper = BigLama(load_lama(lama_file).model.model).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracing is deprecated in torch, yet it is big-lama.pt's format
        traced = torch.jit.trace(wrapper, (torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64)), check_trace=False)
    traced.save(str(folder / "big-lama.pt"))
    return {suffix: folder / f"big-lama{suffix}" for suffix in (".pth", ".safetensors", ".pt")}


@pytest.fixture(scope="module")
def plain_lama(lama_file):
    return load_lama(lama_file)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".pt"])
def test_lama_loads_the_generator_layout_of_the_exported_checkpoints(generator_formats, plain_lama, suffix):
    path = generator_formats[suffix]
    assert all(key.startswith("generator.model.") for key in stored_keys(path))
    model = load_lama(path)
    assert model.architecture.id == "LaMa" and model.purpose == "Inpainting"
    torch.manual_seed(3)
    image, mask = torch.rand(1, 3, 40, 24), torch.zeros(1, 1, 40, 24)
    mask[:, :, 10:30, 6:18] = 1
    with torch.inference_mode():
        assert torch.equal(model(image, mask), plain_lama(image, mask))


# -- errors name the key and the file ----------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "RealESRGAN_x4plus.pth"
    with pytest.raises(ModelFileError, match="file not found") as caught:
        load_esrgan(path)
    assert_names(caught, path, "models.esrgan")


def test_a_folder_is_not_a_file(tmp_path):
    with pytest.raises(ModelFileError, match="not a file") as caught:
        load_lama(tmp_path)
    assert_names(caught, tmp_path, "models.lama")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(ModelFileError, match="unsupported file type '.bin'") as caught:
        load_esrgan(path)
    assert_names(caught, path, "models.esrgan")


@pytest.mark.parametrize("name", ["corrupt.pth", "corrupt.pt", "corrupt.safetensors"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelFileError, match="cannot read the weights") as caught:
        load_lama(path)
    assert_names(caught, path, "models.lama")


def test_truncated_file(tiny_dir, tmp_path):
    path = tmp_path / "truncated.pth"
    path.write_bytes((tiny_dir / "esrgan.pth").read_bytes()[:100_000])
    with pytest.raises(ModelFileError, match="cannot read the weights") as caught:
        load_esrgan(path)
    assert_names(caught, path, "models.esrgan")


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, writer):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"params_ema": Payload()}))
    else:
        torch.save({"params_ema": Payload()}, path)
    with pytest.raises(ModelFileError, match="cannot read the weights .*forbidden"):
        load_esrgan(path)
    assert not marker.exists()


def test_unknown_architecture(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(ModelFileError, match="not of a model architecture spandrel knows") as caught:
        load_esrgan(path)
    assert_names(caught, path, "models.esrgan")


def test_lama_file_configured_as_the_upscaler(lama_file):
    with pytest.raises(ModelFileError, match=r"this is LaMa \(Inpainting.*needs an RGB x4") as caught:
        load_esrgan(lama_file)
    assert_names(caught, lama_file, "models.esrgan")


def test_upscaler_configured_as_the_eraser(tiny_dir):
    path = tiny_dir / "esrgan.pth"
    with pytest.raises(ModelFileError, match=r"this is ESRGAN \(SR, x4\).*needs an inpainting model") as caught:
        load_lama(path)
    assert_names(caught, path, "models.lama")


def test_an_x2_model_is_not_the_x4_upscaler(tmp_path):
    state = build_esrgan_state_dict()
    for key in ("conv_up2.weight", "conv_up2.bias"):
        del state[key]
    path = tmp_path / "x2.pth"
    torch.save({"params_ema": state}, path)
    with pytest.raises(ModelFileError, match=r"x2\).*needs an RGB x4"):
        load_esrgan(path)
