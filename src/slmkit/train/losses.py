"""Loss building blocks for distillation, as pure functions over tensors.

Each function returns the loss *summed* over the positions it keeps, so that an objective module can return
``(loss_sum, n_targets)`` as the Trainer expects (see ``objectives.py``) and the Trainer normalises by the
target count of the whole global batch. ``mask`` is a bool tensor over the leading (position) dimensions,
True where a position carries a loss; :func:`keep_mask` makes one from labels (-100 = no loss). All maths
is done in float32, whatever the dtype of the inputs.

- :func:`token_kl`: Hinton's soft-target loss, KL(p_teacher^T || p_student^T) * T^2 per token.
- :func:`topk_teacher`, :func:`token_kl_topk`: the same with only the teacher's top-k logits kept, as cached
  KD does (MiniLLM / DistiLLM style); :class:`TeacherLogitCache` keeps those on disk so a teacher runs once.
- :func:`hidden_alignment`: squared error between hidden states (TinyBERT / DistilBERT style), after an
  optional projection of the student's width onto the teacher's.
- :func:`attention_alignment`: KL between attention distributions (TinyBERT / MiniLM style).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from numbers import Integral, Real
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import SlmError

IGNORE = -100  # the label of a position that carries no loss (labels follow transformers' convention)
REDUCTIONS = ("sum", "mean", "none")


# ------------------------------------------------------------------ helpers
def keep_mask(labels: torch.Tensor, ignore: int = IGNORE) -> torch.Tensor:
    """True where ``labels`` carries a loss (is not ``ignore``)."""
    return labels != ignore


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not temperature > 0:
        raise SlmError(f"temperature must be a number > 0, got {temperature!r}")
    return float(temperature)


def _check_mask(mask: torch.Tensor | None, lead: torch.Size, what: str) -> torch.Tensor | None:
    """``mask`` as a bool tensor of shape ``lead`` (or None for "keep everything")."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise SlmError(f"{what}: mask must be a bool tensor (True = position has a loss); "
                       f"for labels use keep_mask(labels)")
    if mask.shape != lead:
        raise SlmError(f"{what}: mask has shape {tuple(mask.shape)} but the positions are {tuple(lead)}")
    return mask


def _keep(mask: torch.Tensor | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kept positions of each tensor (leading dims flattened to one), or the tensors as they are. The
    loss is computed on kept positions only: what a dropped position holds (padding, even inf or nan) never
    reaches the loss or its gradient."""
    return tensors if mask is None else tuple(t[mask] for t in tensors)


def _reduce(per_kept: torch.Tensor, mask: torch.Tensor | None, lead: torch.Size, reduction: str,
            what: str) -> torch.Tensor:
    """Sum / mean over kept positions, or ("none") the per-position loss of shape ``lead``, 0 where dropped."""
    if reduction not in REDUCTIONS:
        raise SlmError(f"{what}: reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if reduction == "sum":
        return per_kept.sum()
    if reduction == "mean":
        return per_kept.sum() / max(per_kept.numel(), 1)
    if mask is None:
        return per_kept
    return per_kept.new_zeros(lead).masked_scatter(mask, per_kept)


def _kl_rows(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """sum_v p_t(v) * (log p_t(v) - log p_s(v)) over the last dim; entries with p_t = 0 contribute 0 (also
    where the student's log-prob is -inf there, which a plain product would turn into nan)."""
    p = teacher_logp.exp()
    terms = p * (teacher_logp - student_logp)
    return torch.where(p > 0, terms, terms.new_zeros(())).sum(-1)


# ---------------------------------------------------------------- token KL
def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
             mask: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
    """Forward KL(p_teacher^T || p_student^T) per position, scaled by T^2 (Hinton et al. 2015, so that the
    gradient's size does not shrink as T grows), reduced over kept positions.

    ``student_logits`` and ``teacher_logits``: [..., vocab], the same shape. ``mask``: bool [...], True where a
    position counts. ``reduction``: "sum" (the default, for the Trainer's contract), "mean" over kept
    positions, or "none" (per position, 0 where dropped)."""
    t = _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise SlmError(f"token_kl: student logits {tuple(student_logits.shape)} and teacher logits "
                       f"{tuple(teacher_logits.shape)} differ in shape; distillation needs one vocabulary "
                       f"(slice a padded vocabulary to the real one first)")
    lead = student_logits.shape[:-1]
    mask = _check_mask(mask, lead, "token_kl")
    student_logits, teacher_logits = _keep(mask, student_logits, teacher_logits)
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return _reduce(_kl_rows(teacher, student) * (t * t), mask, lead, reduction, "token_kl")


# ------------------------------------------------------------- top-k KD
def topk_teacher(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ``k`` largest logits per position and their token ids: (values float32 [..., k],
    indices int64 [..., k]), largest first. This is what :class:`TeacherLogitCache` stores."""
    vocab = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, Integral) or not 1 <= k <= vocab:
        raise SlmError(f"topk_teacher: k must be an integer in [1, {vocab}] (the vocabulary), got {k!r}")
    values, indices = torch.topk(teacher_logits.float(), int(k), dim=-1)
    return values, indices


def token_kl_topk(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                  temperature: float = 1.0, mask: torch.Tensor | None = None,
                  reduction: str = "sum") -> torch.Tensor:
    """KL from the teacher's top-k distribution to the student, per position, scaled by T^2.

    The teacher's distribution is the softmax of its top-k logits ``values / T`` alone (renormalised over the
    k tokens); the student's log-probabilities are its *full-vocabulary* ``log_softmax(student / T)``, gathered
    at ``indices``. So the student is not renormalised onto the k tokens: mass it puts elsewhere is still
    penalised (its gathered probabilities sum to less than 1, which only raises the loss, so it stays >= 0),
    which is the choice cached-logit KD makes (MiniLLM / DistiLLM). With k = vocabulary this is exactly
    :func:`token_kl`.

    ``values``, ``indices``: [..., k] as from :func:`topk_teacher` or :meth:`TeacherLogitCache.get` (any float
    / integer dtype); ``student_logits``: [..., vocab] with the same leading shape."""
    t = _check_temperature(temperature)
    if values.shape != indices.shape:
        raise SlmError(f"token_kl_topk: values {tuple(values.shape)} and indices {tuple(indices.shape)} "
                       f"differ in shape")
    if student_logits.shape[:-1] != values.shape[:-1]:
        raise SlmError(f"token_kl_topk: student logits {tuple(student_logits.shape)} and teacher top-k "
                       f"{tuple(values.shape)} cover different positions")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise SlmError(f"token_kl_topk: indices must be an integer tensor, got {indices.dtype}")
    vocab = student_logits.shape[-1]
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
        raise SlmError(f"token_kl_topk: teacher token ids {int(indices.min())}..{int(indices.max())} fall "
                       f"outside the student's vocabulary of {vocab}")
    lead = student_logits.shape[:-1]
    mask = _check_mask(mask, lead, "token_kl_topk")
    student_logits, values, indices = _keep(mask, student_logits, values, indices)
    student = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, indices.long())
    teacher = F.log_softmax(values.float() / t, dim=-1)
    return _reduce(_kl_rows(teacher, student) * (t * t), mask, lead, reduction, "token_kl_topk")


class TeacherLogitCache:
    """Top-k teacher logits on disk, so that a teacher runs over the data once and every epoch (and every
    rank) reads them back.

    One safetensors file per entry in ``folder``, holding ``values`` (float16 [..., k]) and ``indices`` (int32
    [..., k]). A key is a sample index (int >= 0) or a string of letters, digits, ``_``, ``-`` and ``.``, such
    as :meth:`key_for` makes from a sample's token ids. Writes are atomic: the entry goes to a hidden temporary
    file that is then renamed over its final name, so an interrupted write leaves no entry (a stray
    ``.*.tmp`` file at most, never read). ``k``, when given, is recorded in ``cache.json`` on first use and
    checked on every later open and ``put``.
    """

    META = "cache.json"
    _NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")

    def __init__(self, folder: str | Path, k: int | None = None):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise SlmError(f"teacher logit cache {self.folder} exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        if k is not None and (isinstance(k, bool) or not isinstance(k, Integral) or k < 1):
            raise SlmError(f"TeacherLogitCache: k must be a positive integer, got {k!r}")
        meta_path = self.folder / self.META
        stored = None
        if meta_path.exists():
            try:
                stored = json.loads(meta_path.read_text()).get("k")
            except (ValueError, AttributeError) as e:
                raise SlmError(f"teacher logit cache {meta_path} is not valid JSON ({e})") from None
        if stored is not None and k is not None and stored != k:
            raise SlmError(f"teacher logit cache {self.folder} holds top-{stored} logits, asked for top-{k}; "
                           f"use another folder or k={stored}")
        self.k = stored if stored is not None else k
        if stored is None and k is not None:
            self._write_atomic(meta_path, json.dumps({"format": 1, "k": k}).encode())

    @staticmethod
    def key_for(token_ids: Sequence[int] | torch.Tensor) -> str:
        """A content key for a sample: the sha256 of its token ids (as int64 little-endian)."""
        ids = torch.as_tensor(token_ids, dtype=torch.int64).flatten().contiguous()
        return hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()

    def _path(self, key) -> Path:
        if isinstance(key, Integral) and not isinstance(key, bool):
            if key < 0:
                raise SlmError(f"teacher logit cache keys must be >= 0, got {key}")
            return self.folder / f"i{int(key)}.safetensors"
        if isinstance(key, str) and self._NAME.match(key) and not key.startswith("."):
            return self.folder / f"k-{key}.safetensors"
        raise SlmError(f"teacher logit cache key must be an int >= 0 or a string of letters, digits, '_', "
                       f"'-', '.' (such as TeacherLogitCache.key_for(ids)); got {key!r}")

    def __contains__(self, key) -> bool:
        return self._path(key).is_file()

    def __len__(self) -> int:
        return sum(1 for p in self.folder.glob("*.safetensors") if not p.name.startswith("."))

    def put(self, key, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Store one entry (replacing any earlier one): values as float16, indices as int32."""
        if values.shape != indices.shape or values.dim() == 0:
            raise SlmError(f"teacher logit cache: values {tuple(values.shape)} and indices "
                           f"{tuple(indices.shape)} must have one shape [..., k]")
        if self.k is not None and values.shape[-1] != self.k:
            raise SlmError(f"teacher logit cache {self.folder} holds top-{self.k} logits; got "
                           f"{values.shape[-1]} per position")
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise SlmError(f"teacher logit cache: indices must be integers, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) > torch.iinfo(torch.int32).max):
            raise SlmError("teacher logit cache: token ids must lie in [0, 2**31)")
        from safetensors.torch import save

        blob = save({"values": values.detach().to("cpu", torch.float16).contiguous(),
                     "indices": indices.detach().to("cpu", torch.int32).contiguous()})
        self._write_atomic(self._path(key), blob)

    def get(self, key) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(values float16, indices int32) as stored, or None when ``key`` has no entry."""
        path = self._path(key)
        if not path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(path.read_bytes())
            return tensors["values"], tensors["indices"]
        except (SafetensorError, KeyError, ValueError) as e:
            raise SlmError(f"teacher logit cache entry {path} is unreadable ({e}); delete it to recompute") from None

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.get(key)
        if entry is None:
            raise KeyError(key)
        return entry

    def _write_atomic(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


# ---------------------------------------------------------- hidden states
def hidden_alignment(student_h: torch.Tensor, teacher_h: torch.Tensor,
                     proj: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     mask: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
    """Squared error between hidden states, *mean over features*, summed over kept positions.

    ``student_h`` [..., d_student], ``teacher_h`` [..., d_teacher]; ``proj`` (e.g. a trainable
    ``nn.Linear(d_student, d_teacher, bias=False)``, TinyBERT's W_h) maps the student's width onto the
    teacher's and is needed when they differ. Taking the mean over features keeps the loss's scale
    independent of the width; divided by the count of kept positions (as the Trainer does) it is the usual
    MSE over all elements."""
    if proj is not None:
        student_h = proj(student_h)
    if student_h.shape[:-1] != teacher_h.shape[:-1]:
        raise SlmError(f"hidden_alignment: student states {tuple(student_h.shape)} and teacher states "
                       f"{tuple(teacher_h.shape)} cover different positions")
    if student_h.shape[-1] != teacher_h.shape[-1]:
        raise SlmError(f"hidden_alignment: the student's width is {student_h.shape[-1]} and the teacher's "
                       f"{teacher_h.shape[-1]}; pass proj=nn.Linear({student_h.shape[-1]}, "
                       f"{teacher_h.shape[-1]}, bias=False)")
    lead = teacher_h.shape[:-1]
    mask = _check_mask(mask, lead, "hidden_alignment")
    student_h, teacher_h = _keep(mask, student_h, teacher_h)
    per_position = (student_h.float() - teacher_h.float()).pow(2).mean(-1)
    return _reduce(per_position, mask, lead, reduction, "hidden_alignment")


# ------------------------------------------------------------- attention
def attention_alignment(student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                        mask: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
    """KL(teacher attention || student attention) over keys, summed over heads and kept query positions.

    Inputs are attention *probabilities* (after softmax), [batch, heads, queries, keys], the same shape
    (the student and teacher layer must have the same number of heads; MiniLM-v2's relation re-splitting is
    not done here). ``mask``: bool [batch, queries], True where a query position counts. Keys a distribution
    gives no weight (causal or padding) contribute nothing; where the student gives 0 to a key the teacher
    weights, its log is taken at the smallest positive float32 rather than -inf, so the loss stays finite.
    MiniLM averages over heads: divide by the head count for that. ``reduction`` "none" gives [batch, queries]."""
    if student_attn.dim() != 4 or student_attn.shape != teacher_attn.shape:
        raise SlmError(f"attention_alignment: student {tuple(student_attn.shape)} and teacher "
                       f"{tuple(teacher_attn.shape)} attention must both be [batch, heads, queries, keys]"
                       f" of one shape (same head count)")
    b, _, q, _ = student_attn.shape
    lead = torch.Size((b, q))
    mask = _check_mask(mask, lead, "attention_alignment")
    # [batch, queries, heads, keys], so that the mask picks query positions
    student, teacher = _keep(mask, student_attn.float().transpose(1, 2), teacher_attn.float().transpose(1, 2))
    tiny = torch.finfo(torch.float32).tiny
    terms = teacher * (teacher.clamp_min(tiny).log() - student.clamp_min(tiny).log())
    per_query = torch.where(teacher > 0, terms, terms.new_zeros(())).sum(-1).sum(-1)  # keys, then heads
    return _reduce(per_query, mask, lead, reduction, "attention_alignment")
