"""LoRA (Hu et al. 2021): low-rank adapters on the linear layers of a frozen model.

A wrapped linear layer computes ``W x + (alpha / r) * B A dropout(x)`` with ``A`` [r, in] initialised
at random (Kaiming-uniform, as PEFT does) and ``B`` [out, r] at zero, so a fresh adapter changes
nothing. Only ``A`` and ``B`` train; every other parameter is frozen. ``merge_lora`` folds ``B A``
back into ``W`` for inference at the base model's speed.

As in PEFT, the adapter weights are kept in float32 whatever the base dtype (a bf16 base trains a
float32 adapter); the adapter's output is cast back to the base output's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import SlmError

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class LoRALinear(nn.Module):
    """``base(x) + lora_B(lora_A(dropout(x))) * scaling`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise SlmError(f"LoRA wraps nn.Linear layers, not {type(base).__name__}")
        if r <= 0:
            raise SlmError(f"LoRA rank r must be a positive integer, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise SlmError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.base.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r  # rsLoRA: Kalajdzievski 2023
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora()

    def reset_lora(self) -> None:
        """PEFT's default initialisation: A Kaiming-uniform (a=sqrt(5), like nn.Linear), B zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        delta = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype)))
        return out + (delta * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` [out, in] in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` (base dtype and device) whose weight is ``W + scaling * B @ A``."""
        w = self.base.weight
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=w.device, dtype=w.dtype)
        out.weight.copy_((w.float() + self.delta_weight()).to(w.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def check_can_adapt(model: nn.Module) -> None:
    """SlmError unless the model is a float model without adapters yet."""
    if getattr(model, "quant", "none") != "none":
        raise SlmError("LoRA needs the float model; this one was loaded compact (quantized) — load it without quant=")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise SlmError("this model already has LoRA adapters; merge_lora() it (or load a fresh model) first")


def linear_names(model: nn.Module) -> list[str]:
    """The attribute names (last path component) of the model's nn.Linear layers, sorted."""
    return sorted({name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def wrap_modules(model: nn.Module, names: Iterable[str], r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> list[str]:
    """Wrap the nn.Linear modules at the given full paths (``layers.0.attn.q``...) and freeze the rest."""
    check_can_adapt(model)
    if r <= 0:
        raise SlmError(f"LoRA rank r must be a positive integer, got {r}")
    names = list(names)
    modules = dict(model.named_modules())
    for name in names:
        if not isinstance(modules.get(name), nn.Linear):
            found = "no such module" if name not in modules else f"a {type(modules[name]).__name__}"
            raise SlmError(f"cannot put a LoRA adapter on {name!r}: {found} (LoRA wraps nn.Linear layers)")
    model.requires_grad_(False)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoRALinear(modules[name], r, alpha, dropout, use_rslora)
        setattr(parent, attr, wrapped.train(modules[name].training))  # an eval model stays in eval mode
    return names


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets: Iterable[str] = DEFAULT_TARGETS, use_rslora: bool = False) -> list[str]:
    """Wrap every nn.Linear whose attribute name is in ``targets`` (slmkit names: q, k, v, o, gate, up,
    down, lm_head) in a :class:`LoRALinear`; freeze every other parameter. Returns the wrapped paths.

    A standard name this model lacks (phi has no ``gate``) is skipped; any other unmatched name is an error.
    """
    check_can_adapt(model)
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if r <= 0:
        raise SlmError(f"LoRA rank r must be a positive integer, got {r}")
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets]
    if not names:
        raise SlmError(f"no linear layer matches the LoRA targets {list(targets)}; "
                       f"this model's linear layers are named {linear_names(model)}")
    # a layer another family has (phi has no "gate") is skipped; anything else is a mistake
    unknown = sorted(set(targets) - set(linear_names(model)) - set(DEFAULT_TARGETS))
    if unknown:
        tied = " (lm_head is tied to the embedding in this model)" if "lm_head" in unknown else ""
        raise SlmError(f"LoRA target(s) {unknown} match no linear layer of this model{tied}; "
                       f"its linear layers are named {linear_names(model)}")
    return wrap_modules(model, names, r, alpha, dropout, use_rslora)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Path -> LoRALinear for every adapter in the model (in module order)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged nn.Linear, in place; returns the model."""
    for name, m in lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, m.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: ``layers.0.attn.q.lora_A.weight``, ``...lora_B.weight``..."""
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{name}.lora_A.weight"] = m.lora_A.weight
        state[f"{name}.lora_B.weight"] = m.lora_B.weight
    return state
