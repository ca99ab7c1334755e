"""mmedit.loading: load (multimodal model + processor) and load_model (any HF checkpoint): offline local
loading, devices, dtypes, and one-line errors."""
import json

import pytest
import torch

from mmedit import zoo
from mmedit.errors import MmeditError
from mmedit.loading import load, load_model, resolve_device


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return zoo.tiny("llava", root=tmp_path_factory.getbasetemp() / "zoo")


def test_loads_offline_in_eval_mode(llava, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = load(str(llava), device="cpu", dtype="bfloat16")
    assert not model.training and model.dtype == torch.bfloat16
    assert next(model.parameters()).device.type == "cpu"
    assert processor.tokenizer is not None and processor.image_processor is not None
    model, _ = load(llava, device="auto", dtype="auto")
    assert model.dtype == torch.float32


def test_errors_are_one_line(llava, tmp_path):
    cases = [
        ({"name_or_path": tmp_path / "missing"}, "model path not found"),
        ({"name_or_path": "./relative/missing"}, "model path not found"),
        ({"name_or_path": "bse"}, r"model path not found: bse \(no such folder; hub ids are owner/name\)"),
        ({"name_or_path": tmp_path}, "not a model directory"),
        ({"name_or_path": llava, "dtype": "int8"}, "unknown dtype 'int8'"),
        ({"name_or_path": llava, "device": "tpu"}, "unknown device 'tpu'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(MmeditError, match=message) as error:
            load(**kwargs)
        assert "\n" not in str(error.value)


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(MmeditError, match="unsupported model_type 'bert'; supported: .*llava"):
        load(tmp_path, device="cpu")


def test_broken_weights_are_one_line(llava, tmp_path):
    target = tmp_path / "copy"
    target.mkdir()
    for path in llava.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    (target / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(MmeditError, match="cannot load"):
        load(target, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_asked_but_unavailable():
    for device in ("cuda", "cuda:1"):
        with pytest.raises(MmeditError, match="CUDA is not available"):
            resolve_device(device)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_load_model_takes_any_architecture_and_refuses_what_it_cannot_build(llava, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = load_model(llava, dtype="bfloat16")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and not model.training
    assert model.dtype == torch.bfloat16
    text_only = tmp_path / "llama"  # not a family `load` supports, but a checkpoint merge and diff take
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=40)).save_pretrained(text_only)
    assert type(load_model(text_only)).__name__ == "LlamaForCausalLM"
    with pytest.raises(MmeditError, match="unsupported model_type 'llama'"):
        load(text_only, device="cpu")
    config = json.loads((text_only / "config.json").read_text())
    (text_only / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModel"]}))
    with pytest.raises(MmeditError, match="architecture NoSuchModel is not in transformers"):
        load_model(text_only)
    with pytest.raises(MmeditError, match="not a model directory"):
        load_model(tmp_path)
    with pytest.raises(MmeditError, match="model path not found"):
        load_model(tmp_path / "missing")


class Tripwire:
    """Unpickling this writes a file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_weights_are_never_loaded(llava, tmp_path):
    """A checkpoint with only pytorch_model.bin (here a booby-trapped pickle) is one error line naming the
    file, for both loaders and the CLI's merge; nothing is unpickled."""
    import pickle
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(llava, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Tripwire(marker)))
    for loader in (load, load_model):
        with pytest.raises(MmeditError, match=r"weights only as pickle \(pytorch_model.bin\); mmedit loads "
                                              "safetensors only") as error:
            loader(folder, device="cpu")
        assert "\n" not in str(error.value)
    assert not marker.exists()


def test_cli_thread_default_is_one_thread_for_small_models_on_cpu(llava, monkeypatch):
    """--threads 0 (the default): 1 thread below SMALL_MODEL parameters on the CPU, torch's own above; a
    number given is used as is."""
    from mmedit.cli import common

    default = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        common.load_model(str(llava), "cpu", "auto", False, threads=0)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setattr(common, "SMALL_MODEL", 10)  # the tiny model now counts as large
        common.load_model(str(llava), "cpu", "auto", False, threads=0)
        assert torch.get_num_threads() == 2
        common.load_model(str(llava), "cpu", "auto", False, threads=3)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(default)


def test_cli_makes_openmp_wait_passively_unless_told_otherwise():
    """Set before torch loads: spinning OpenMP waits make several threads far slower on a busy machine."""
    import os
    import subprocess
    import sys

    code = "import mmedit.cli.main, os, sys; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert shown.stdout.split() == ["PASSIVE", "False"]  # and torch is not loaded yet, so libgomp will see it
    mine = subprocess.run([sys.executable, "-c", code], env=env | {"OMP_WAIT_POLICY": "ACTIVE"},
                          capture_output=True, text=True, check=True)
    assert mine.stdout.split()[0] == "ACTIVE"
