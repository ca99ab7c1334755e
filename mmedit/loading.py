"""Load a model from a local directory (offline) or a hub id: a multimodal model of a supported family
with its processor (`load`), or any HF checkpoint as the class its config names (`load_model`)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError

from mmedit.errors import MmeditError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LOAD_ERRORS = (OSError, ImportError, ValueError, SafetensorError)  # bad files, or a missing library


def resolve_device(device: str) -> torch.device:
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise MmeditError(f"device {device!r} asked for, but CUDA is not available here (try --device cpu)")
        if device != "cuda" and int(device[5:]) >= torch.cuda.device_count():
            raise MmeditError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device(device)
    raise MmeditError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def resolve_dtype(dtype: str) -> torch.dtype | str:
    if dtype == "auto":
        return "auto"  # as saved in the checkpoint
    if dtype not in DTYPES:
        raise MmeditError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def without_video(processor_class: type) -> type:
    """processor_class, or, when torchvision is missing and the class wants a video processor (Qwen2-VL,
    Qwen2.5-VL, SmolVLM), a same-named subclass without one. Video processors need torchvision, which
    mmedit does not: it never feeds video, and image + text processing is unchanged."""
    from transformers.utils import is_torchvision_available

    attributes = [name for name in processor_class.get_attributes() if name != "video_processor"]
    if is_torchvision_available() or len(attributes) == len(processor_class.get_attributes()):
        return processor_class
    namespace = {"get_attributes": classmethod(lambda cls: attributes), "__module__": processor_class.__module__}
    return type(processor_class.__name__, (processor_class,), namespace)


def _processor(source: str, config, options: dict):
    """AutoProcessor; if it fails on a video processor it cannot build, the processor without one."""
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    try:
        return AutoProcessor.from_pretrained(source, **options)
    except (OSError, ImportError, ValueError):
        known = PROCESSOR_MAPPING.get(type(config), None)
        if known is None or without_video(known) is known:
            raise
        return without_video(known).from_pretrained(source, **options)


def _looks_local(name: str) -> bool:
    """Hub ids are `owner/name`; anything else that is not on disk is a missing path (a typo such as `bse`
    is said at once, never sent to the hub for half a minute of retries)."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or "\\" in name


def _config(name_or_path: str | Path, trust_remote_code: bool):
    """(source, from_pretrained options, config). A local directory never touches the network."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MmeditError(f"not a model directory (no config.json): {path}")
        source = str(path)
    elif _looks_local(str(name_or_path)):
        raise MmeditError(f"model path not found: {path} (no such folder; hub ids are owner/name)")
    else:
        source = str(name_or_path)
    options = dict(local_files_only=path.exists(), trust_remote_code=trust_remote_code)
    try:
        return source, options, AutoConfig.from_pretrained(source, **options)
    except (OSError, ValueError) as error:
        raise MmeditError(f"cannot read the model config of {source}: {first_line(error)}") from None


def _weights_only_safetensors(source: str) -> None:
    """mmedit never unpickles: a local checkpoint whose weights exist only as pickle files is one clear error
    naming the file (from_pretrained itself is called with use_safetensors=True)."""
    path = Path(source)
    if path.is_dir() and not any(path.glob("*.safetensors")):
        pickles = sorted(item.name for item in path.iterdir() if item.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise MmeditError(f"{path}: weights only as pickle ({pickles[0]}); mmedit loads safetensors only "
                              "(convert with the model's save_pretrained(safe_serialization=True) in a trusted setting)")


def load(name_or_path: str | Path, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
    """(model, processor) of a supported multimodal family, in eval mode."""
    from transformers import AutoModelForImageTextToText

    from mmedit.arch.registry import family

    target, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    source, options, config = _config(name_or_path, trust_remote_code)
    family(getattr(config, "model_type", None))  # unsupported families fail here, before any weights load
    try:
        _weights_only_safetensors(source)
        model = AutoModelForImageTextToText.from_pretrained(source, config=config, dtype=torch_dtype,
                                                            use_safetensors=True, **options)
        processor = _processor(source, config, options)
    except _LOAD_ERRORS as error:
        raise MmeditError(f"cannot load {source}: {first_line(error)}") from None
    return model.to(target).eval(), processor


def load_model(name_or_path: str | Path, *, device: str = "cpu", dtype: str = "auto",
               trust_remote_code: bool = False) -> torch.nn.Module:
    """Any HF checkpoint as the class its config names (config.architectures), in eval mode, refusing one
    that lacks weights transformers would initialise at random (they must never reach a merged checkpoint)."""
    import transformers

    target, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    source, options, config = _config(name_or_path, trust_remote_code)
    name = (config.architectures or [""])[0]
    model_class = getattr(transformers, name, None)
    if model_class is None and trust_remote_code:  # the Auto class whose auto_map entry names this class
        auto_map = getattr(config, "auto_map", None) or {}
        auto = next((key for key, ref in auto_map.items() if isinstance(ref, str) and ref.endswith(f".{name}")), None)
        model_class = getattr(transformers, auto, None) if auto else None
    if model_class is None:
        raise MmeditError(f"{source}: architecture {name or '(none)'} is not in transformers "
                          f"{transformers.__version__} (pass --trust-remote-code if the checkpoint ships its code)")
    try:
        _weights_only_safetensors(source)
        model, info = model_class.from_pretrained(source, config=config, dtype=torch_dtype, output_loading_info=True,
                                                  use_safetensors=True, **options)
    except _LOAD_ERRORS as error:
        raise MmeditError(f"cannot load {source}: {first_line(error)}") from None
    missing = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
    if missing:
        raise MmeditError(f"{source}: checkpoint lacks or mis-shapes weight {missing[0]} ({len(missing)} in all)")
    return model.to(target).eval()
