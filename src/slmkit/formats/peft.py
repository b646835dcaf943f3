"""PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors), in and out.

The files are the ones ``peft`` writes with ``save_pretrained`` and reads with
``PeftModel.from_pretrained``: tensors are named after the Hugging Face module paths
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``) and the config lists the HF
module names (``q_proj``, phi's ``dense``...). slmkit's names are mapped through formats.keys, so
every family slmkit reads works.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ModelFileError, SlmError, UnsupportedError
from ..nn.lora import check_can_adapt, lora_modules, wrap_modules
from .hf import write_folder_atomically
from .keys import HF_KEYS, hf_to_slm, slm_to_hf

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the HF model
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _family(model: nn.Module, family: str | None) -> str:
    family = family or getattr(getattr(model, "cfg", None), "family", None)
    if family not in HF_KEYS:
        raise SlmError(f"unknown model family {family!r} for a PEFT adapter (choose from {', '.join(HF_KEYS)})")
    return family


def _hf_module(path: str, family: str) -> str:
    return slm_to_hf(path + ".weight", family)[: -len(".weight")]


def _slm_module(path: str, family: str) -> str:
    return hf_to_slm(path + ".weight", family)[: -len(".weight")]


def _one(values: set, what: str):
    if len(values) != 1:
        raise UnsupportedError(f"the adapters differ in {what} ({sorted(values)}); a PEFT file stores one value")
    return values.pop()


def _check_given(what: str, given, actual) -> None:
    if given is not None and given != actual:
        raise SlmError(f"{what}={given!r} does not match the model's LoRA adapters ({what}={actual!r})")


def save_peft_adapter(model: nn.Module, folder: str | Path, *, family: str | None = None, r: int | None = None,
                      alpha: float | None = None, dropout: float | None = None, targets=None,
                      base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter folder, atomically.

    ``family``, ``r``, ``alpha``, ``dropout`` and ``targets`` (slmkit names) default to what the
    model's adapters hold; when given they must agree with them.
    """
    mods = lora_modules(model)
    if not mods:
        raise SlmError("the model has no LoRA adapters to save (apply_lora first)")
    family = _family(model, family)
    rank = _one({m.r for m in mods.values()}, "rank r")
    lora_alpha = _one({m.alpha for m in mods.values()}, "alpha")
    rslora = _one({m.use_rslora for m in mods.values()}, "use_rslora")
    model_dropout = _one({getattr(m.dropout, "p", 0.0) for m in mods.values()}, "dropout")
    _check_given("r", r, rank)
    _check_given("alpha", alpha, lora_alpha)
    if targets is not None:
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        extra = sorted({name.rpartition(".")[2] for name in mods} - set(targets))
        if extra:
            raise SlmError(f"the model has LoRA adapters on {extra}, which are not in targets {list(targets)}")

    state, hf_names = {}, set()
    for name, m in mods.items():
        hf = _hf_module(name, family)
        hf_names.add(hf.rpartition(".")[2])
        state[PREFIX + hf + ".lora_A.weight"] = m.lora_A.weight.detach().contiguous().cpu()
        state[PREFIX + hf + ".lora_B.weight"] = m.lora_B.weight.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": lora_alpha,
        "lora_dropout": model_dropout if dropout is None else dropout,
        "target_modules": sorted(hf_names),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": rslora,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "layer_replication": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "auto_mapping": None,
    }
    return _write_atomically(Path(folder), state, config)


def _write_atomically(folder: Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    """Both files go to a temporary sibling that is then renamed into place (an old folder is replaced)."""
    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write_folder_atomically(folder, fill)


def read_peft_config(folder: str | Path) -> dict:
    """The adapter's config, checked to be a plain LoRA adapter slmkit can apply."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ModelFileError(f"{Path(folder)}: no {CONFIG_FILE} (not a PEFT adapter folder)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: invalid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise UnsupportedError(f"{path}: peft_type is {cfg.get('peft_type')!r}; slmkit reads LoRA adapters only")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise ModelFileError(f"{path}: {key} must be a positive number, got {cfg.get(key)!r}")
    unsupported = {
        "use_dora": bool(cfg.get("use_dora")),
        "bias": cfg.get("bias", "none") != "none",
        "lora_bias": bool(cfg.get("lora_bias")),
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "layer_replication": bool(cfg.get("layer_replication")),
        "target_parameters": bool(cfg.get("target_parameters")),
        "trainable_token_indices": bool(cfg.get("trainable_token_indices")),
    }
    bad = [f"{k}={cfg.get(k)!r}" for k, on in unsupported.items() if on]
    if bad:
        raise UnsupportedError(f"{path}: LoRA options slmkit does not support: {', '.join(bad)}")
    return cfg


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    legacy = folder / "adapter_model.bin"
    try:
        if path.is_file():
            return load_file(str(path))
        if legacy.is_file():
            return torch.load(legacy, weights_only=True, map_location="cpu")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ModelFileError(f"{folder}: cannot read the adapter weights ({str(e).splitlines()[0]})") from None
    raise ModelFileError(f"{folder}: no {WEIGHTS_FILE} (or adapter_model.bin)")


def load_peft_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Put the PEFT LoRA adapter in ``folder`` (written by slmkit or by peft) on the model.

    The tensors decide which layers get an adapter; nothing is changed unless every tensor matches
    a linear layer of the model with the right shape. Returns the wrapped module paths.
    """
    folder = Path(folder)
    cfg = read_peft_config(folder)
    check_can_adapt(model)
    family = _family(model, None)
    r = int(cfg["r"])
    tensors = _read_weights(folder)
    if not tensors:
        raise ModelFileError(f"{folder / WEIGHTS_FILE}: holds no tensors")

    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, value in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            problems.append(f"{key} (not a LoRA A/B weight of a causal LM)")
            continue
        name = _slm_module(key[len(PREFIX): -len(suffix)], family)
        if not isinstance(modules.get(name), nn.Linear):
            problems.append(f"{key} (the model has no linear layer {name!r})")
            continue
        pairs.setdefault(name, {})[suffix[1:7]] = value
    for name, ab in pairs.items():
        linear = modules[name]
        want = {"lora_A": (r, linear.in_features), "lora_B": (linear.out_features, r)}
        for part, shape in want.items():
            if part not in ab:
                problems.append(f"{name}: {part} is missing")
            elif tuple(ab[part].shape) != shape:
                problems.append(f"{name}.{part}: shape {tuple(ab[part].shape)}, the model needs {shape}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        raise SlmError(f"{folder}: the adapter does not match this model ({family}): {shown}")

    in_model_order = [n for n in modules if n in pairs]
    names = wrap_modules(model, in_model_order, r, cfg["lora_alpha"], float(cfg.get("lora_dropout") or 0.0),
                         bool(cfg.get("use_rslora")))
    with torch.no_grad():
        for name in names:
            m = model.get_submodule(name)
            m.lora_A.weight.copy_(pairs[name]["lora_A"])
            m.lora_B.weight.copy_(pairs[name]["lora_B"])
    return names
