"""Load a model from a local directory (offline) or a hub id: a multimodal model of a supported family
with its processor (`load`), or any HF checkpoint as the class its config names (`load_model`).

On one device (`device`), or dispatched over several by transformers/accelerate (`device_map`: auto,
balanced, sequential, or {module name: device}; `max_memory` bounds the strategies): modules on a GPU or
the CPU hold their weights there; offloaded modules ("cpu" beside a GPU, "disk") hold meta tensors whose
values live in their accelerate hook's weights map and reach the execution device for each forward.
`offloaded_values` finds where such a tensor's values really are, so that a delta changes them there;
`input_device` is where a dispatched model takes its inputs. Disk offload reads the checkpoint's own
safetensors files (never written); what it must re-save goes to `offload_dir`, by default a temporary
folder removed with the model.
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
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


STRATEGIES = ("auto", "balanced", "sequential")  # device maps transformers computes from the free memory


def read_device_map(value: str | Path) -> str | dict:
    """--device-map: a strategy (auto, balanced, sequential) or a JSON file {module name: device}, each
    device "cpu", "disk", a GPU index N, "cuda" or "cuda:N" (GPUs become their index)."""
    from mmedit.safefile import parse_json

    if str(value) in STRATEGIES:
        return str(value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise MmeditError(f"--device-map {value}: neither {', '.join(STRATEGIES)} nor a JSON file")
    try:
        loaded = parse_json(path.read_text(encoding="utf-8"), f"device map {path}")
    except (OSError, UnicodeDecodeError) as error:
        raise MmeditError(f"cannot read device map {path}: {first_line(error)}") from None
    if not isinstance(loaded, dict) or not loaded:
        raise MmeditError(f"device map {path} must be a JSON object {{module name: device}}")
    return {str(name): _map_device(device, f"device map {path}: {name or '(the whole model)'}")
            for name, device in loaded.items()}


def _map_device(device, what: str) -> str | int:
    if device in ("cpu", "disk"):
        return device
    if isinstance(device, str) and (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        return int(device[5:] or 0)
    if type(device) is int and device >= 0:
        return device
    raise MmeditError(f"{what} -> {device!r}: a device is cpu, disk, a GPU index N, cuda or cuda:N")


def check_placement(device: str, device_map: str | dict | None, max_memory: dict | None = None, *,
                    here: bool = True) -> None:
    """One line for a --device that contradicts the device map, a --max-memory without a strategy to bound,
    or (`here`: the run is on this machine) GPUs the map names that this machine lacks."""
    if device_map is None:
        if max_memory:
            raise MmeditError("--max-memory bounds a --device-map strategy (auto, balanced, sequential); give one")
        return
    if max_memory and not isinstance(device_map, str):
        raise MmeditError("--max-memory bounds a --device-map strategy; a device map file places every module "
                          "itself (drop one of them)")
    gpus = sorted({value for value in device_map.values() if type(value) is int}) if isinstance(device_map, dict) \
        else ([0] if torch.cuda.is_available() or not here else [])
    shown = f"--device-map {device_map}" if isinstance(device_map, str) else "the device map"
    if device == "cpu" and gpus:
        raise MmeditError(f"--device cpu contradicts {shown}, which puts modules on GPU {gpus[0]}; leave --device "
                          "at auto or drop --device-map")
    if device.startswith("cuda:") and isinstance(device_map, str):
        raise MmeditError(f"--device {device} contradicts {shown}, which picks the GPUs itself; leave --device at "
                          f"auto and bound the GPUs with --max-memory (e.g. {device[5:]}=40GiB,cpu=100GiB)")
    if device.startswith("cuda") and not gpus:
        raise MmeditError(f"--device {device} contradicts {shown}, which keeps every module on the CPU or disk; "
                          "leave --device at auto")
    if device.startswith("cuda:") and isinstance(device_map, dict) and gpus != [int(device[5:])]:
        raise MmeditError(f"--device {device} contradicts the device map, which uses GPU(s) "
                          f"{', '.join(map(str, gpus))}; leave --device at auto")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        resolve_device(device)  # the usual error
    for index in gpus + [key for key in (max_memory or {}) if type(key) is int] if here else ():
        if index >= torch.cuda.device_count():  # GPUs this machine lacks
            raise MmeditError(f"{shown} uses GPU {index}, but this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")


def _placement(device: str, device_map, max_memory, offload_dir) -> tuple[dict, torch.device | None, Path | None]:
    """(from_pretrained options, the device to move the model to or None when dispatched, a temporary
    offload folder to remove with the model or None)."""
    if device_map is None:
        check_placement(device, None, max_memory)
        return {}, resolve_device(device), None
    check_placement(device, device_map, max_memory)
    temporary = None
    if offload_dir is None:
        temporary = offload_dir = Path(tempfile.mkdtemp(prefix="mmedit-offload-"))
    options = dict(device_map=device_map, offload_folder=str(offload_dir))
    if max_memory:
        options["max_memory"] = dict(max_memory)
    return options, None, temporary


def _check_map_names(build, config, device_map) -> None:
    """Every module a device map names exists in the model (`build(config)` on the meta device: no weights)."""
    if not isinstance(device_map, dict):
        return
    with torch.device("meta"):
        modules = dict(build(config).named_modules())
    unknown = [name for name in device_map if name not in modules]
    if unknown:
        raise MmeditError(f"the device map names {unknown[0]!r}, which is no module of this "
                          f"{config.model_type} model (names as in model.named_modules())")


def _placed(model, target: torch.device | None, temporary: Path | None):
    """The loaded model moved to `target` (one device), or as transformers dispatched it; a temporary
    offload folder is removed when the model is (or at exit)."""
    if temporary is not None:
        weakref.finalize(model, shutil.rmtree, temporary, True)
    return (model if target is None else model.to(target)).eval()


def input_device(model: torch.nn.Module) -> torch.device:
    """Where `model` takes its inputs: a dispatched model's execution device (its top accelerate hook's;
    its parameters may be on several devices, or on meta where offloaded), else its parameters' device."""
    hook = getattr(model, "_hf_hook", None)
    for one in getattr(hook, "hooks", (hook,)):
        if getattr(one, "execution_device", None) is not None:
            return torch.device(one.execution_device)
    return next(model.parameters()).device


def offloaded_values(model: torch.nn.Module, tensor: torch.Tensor, what: str) -> torch.Tensor:
    """The tensor that really holds `tensor`'s values: `tensor` itself unless it is on the meta device;
    for a parameter or buffer accelerate offloaded, the value in its module hook's weights map (CPU
    memory), where a write is what the next forward uses. A disk-offloaded one is read into CPU memory
    once (with every name tied to the same file entry) and kept there: the file is never written.
    MmeditError (prefixed with `what`) for a meta tensor no hook holds."""
    if tensor.device.type != "meta":
        return tensor
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for one in getattr(hook, "hooks", (hook,)):
            if getattr(one, "offload", False) and getattr(one, "weights_map", None) is not None:
                recurse = getattr(one, "place_submodules", False)
                owned = [*module.named_parameters(recurse=recurse), *module.named_buffers(recurse=recurse)]
                name = next((name for name, own in owned if own is tensor), None)
                if name is not None:
                    return _in_memory(one.weights_map, name, tensor, what)
    raise MmeditError(f"{what} is on the meta device and no accelerate hook holds its values; load the weights first")


def _in_memory(weights_map, key: str, tensor: torch.Tensor, what: str) -> torch.Tensor:
    """The tensor in CPU memory that `weights_map` serves for `key` (a PrefixedDataset over accelerate's
    OffloadedWeightsLoader, or cpu_offload's plain dict): a disk entry is read in once and served from then on."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    while isinstance(weights_map, PrefixedDataset):
        weights_map, key = weights_map.dataset, weights_map.prefix + key
    if isinstance(weights_map, OffloadedWeightsLoader) and key not in weights_map.state_dict:
        value = weights_map[key].to("cpu")  # read from its file once; later reads see this copy
        entry = weights_map.index[key]
        for alias, info in weights_map.index.items():
            if info == entry:  # tied weights offloaded to the same file entry stay one tensor
                weights_map.state_dict[alias] = value
    store = weights_map.state_dict if isinstance(weights_map, OffloadedWeightsLoader) else weights_map
    if not isinstance(store, dict) or key not in store:
        raise MmeditError(f"{what} is offloaded to a store mmedit cannot write into ({type(store).__name__})")
    value = store[key]
    if value.shape != tensor.shape or value.dtype != tensor.dtype:
        raise MmeditError(f"{what}: its offloaded value is {value.dtype}{list(value.shape)}, the model's "
                          f"{tensor.dtype}{list(tensor.shape)}")
    return value


def load(name_or_path: str | Path, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False, *,
         device_map: str | dict | None = None, max_memory: dict | None = None, offload_dir: str | Path | None = None):
    """(model, processor) of a supported multimodal family, in eval mode: on `device`, or dispatched by
    `device_map` (see the module docstring; `device` must then be auto or agree with the map)."""
    from transformers import AutoModelForImageTextToText

    from mmedit.arch.registry import family

    torch_dtype = resolve_dtype(dtype)
    placement, target, temporary = _placement(device, device_map, max_memory, offload_dir)
    try:
        source, options, config = _config(name_or_path, trust_remote_code)
        family(getattr(config, "model_type", None))  # unsupported families fail here, before any weights load
        _check_map_names(AutoModelForImageTextToText.from_config, config, device_map)
        try:
            _weights_only_safetensors(source)
            model = AutoModelForImageTextToText.from_pretrained(source, config=config, dtype=torch_dtype,
                                                                use_safetensors=True, **options, **placement)
            processor = _processor(source, config, options)
        except _LOAD_ERRORS as error:
            raise MmeditError(f"cannot load {source}: {first_line(error)}") from None
    except BaseException:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    return _placed(model, target, temporary), processor


def load_model(name_or_path: str | Path, *, device: str = "cpu", dtype: str = "auto",
               trust_remote_code: bool = False, device_map: str | dict | None = None, max_memory: dict | None = None,
               offload_dir: str | Path | None = None) -> torch.nn.Module:
    """Any HF checkpoint as the class its config names (config.architectures), in eval mode, refusing one
    that lacks weights transformers would initialise at random (they must never reach a merged checkpoint).
    `device_map` and the rest: as for `load`."""
    import transformers

    torch_dtype = resolve_dtype(dtype)
    placement, target, temporary = _placement(device, device_map, max_memory, offload_dir)
    try:
        source, options, config = _config(name_or_path, trust_remote_code)
        name = (config.architectures or [""])[0]
        model_class = getattr(transformers, name, None)
        if model_class is None and trust_remote_code:  # the Auto class whose auto_map entry names this class
            auto_map = getattr(config, "auto_map", None) or {}
            auto = next((key for key, ref in auto_map.items() if isinstance(ref, str) and ref.endswith(f".{name}")),
                        None)
            model_class = getattr(transformers, auto, None) if auto else None
        if model_class is None:
            raise MmeditError(f"{source}: architecture {name or '(none)'} is not in transformers "
                              f"{transformers.__version__} (pass --trust-remote-code if the checkpoint ships its code)")
        _check_map_names(model_class, config, device_map)
        try:
            _weights_only_safetensors(source)
            model, info = model_class.from_pretrained(source, config=config, dtype=torch_dtype,
                                                      output_loading_info=True, use_safetensors=True, **options,
                                                      **placement)
        except _LOAD_ERRORS as error:
            raise MmeditError(f"cannot load {source}: {first_line(error)}") from None
        missing = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
        if missing:
            raise MmeditError(f"{source}: checkpoint lacks or mis-shapes weight {missing[0]} ({len(missing)} in all)")
    except BaseException:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    return _placed(model, target, temporary)
