"""Log-likelihood of continuations, with the choices of one question packed into one sequence.

A question's context is run once: the row holds ``context + choice_1 + choice_2 + ...``, each choice
placed at the positions right after the context and masked so it sees the context and itself only.
The log-probabilities equal scoring each ``context + choice`` separately (lm-evaluation-harness's way,
tested in tests/test_eval.py) at a fraction of the tokens. Only the positions that predict a choice
token go through the output head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

ROW_BUDGET = 1024  # packed tokens per row before a question's choices are split over several rows


@dataclass
class Group:
    """One context with the continuations to score after it (token ids)."""
    context: list[int]
    continuations: list[list[int]]


@dataclass
class Score:
    logprob: float  # sum of the continuation tokens' log-probabilities
    greedy: bool  # every continuation token is the argmax at its position
    tokens: int


@dataclass
class _Row:
    group: int
    context: list[int]
    conts: list[tuple[int, list[int]]]  # (index within the group, token ids)

    def __len__(self) -> int:
        return len(self.context) + sum(len(c) for _, c in self.conts)


def truncate_context(context: list[int], continuation_len: int, max_length: int) -> list[int]:
    """Keep the context's tail so that context + continuation (less the last token) fits ``max_length``."""
    keep = max_length + 1 - continuation_len
    if keep < 1:
        raise ValueError(f"a continuation of {continuation_len} tokens does not fit a context of {max_length}")
    return context[-keep:]


def _rows(groups: list[Group], max_length: int) -> list[_Row]:
    rows = []
    for g, group in enumerate(groups):
        longest = max(len(c) for c in group.continuations)
        context = truncate_context(group.context, longest, max_length)
        row = _Row(g, context, [])
        for i, cont in enumerate(group.continuations):
            if row.conts and len(row) + len(cont) > max(ROW_BUDGET, len(context) + longest):
                rows.append(row)
                row = _Row(g, context, [])
            row.conts.append((i, cont))
        rows.append(row)
    return rows


def _pack(rows: list[_Row], pad_id: int, bidirectional_context: bool = False):
    """Token ids, RoPE positions, attention mask, and per continuation token (row, predictor slot, target).
    ``bidirectional_context``: the context's tokens see each other in both directions (a prefix LM)."""
    t = max(len(r) for r in rows)
    b = len(rows)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    positions = torch.zeros((b, t), dtype=torch.long)
    segment = torch.full((b, t), -1, dtype=torch.long)  # 0 = context, k = k-th continuation, -1 = padding
    picks: list[tuple[int, int, int]] = []  # (batch row, predictor slot, target id)
    for r, row in enumerate(rows):
        n = len(row.context)
        ids[r, :n] = torch.tensor(row.context)
        positions[r, :n] = torch.arange(n)
        segment[r, :n] = 0
        slot = n
        for k, (_, cont) in enumerate(row.conts, 1):
            m = len(cont)
            ids[r, slot:slot + m] = torch.tensor(cont)
            positions[r, slot:slot + m] = torch.arange(n, n + m)
            segment[r, slot:slot + m] = k
            for j, token in enumerate(cont):
                picks.append((r, n - 1 if j == 0 else slot + j - 1, token))
            slot += m
    q = torch.arange(t)
    causal = q[None, :] <= q[:, None]
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    mask = causal[None] & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    if bidirectional_context:
        mask |= (seg_q == 0) & (seg_k == 0)
    mask |= torch.eye(t, dtype=torch.bool)[None]  # padding slots see themselves (no all-masked rows)
    return ids, positions, mask, picks


@torch.inference_mode()
def score_groups(model, groups: list[Group], batch_size: int = 16, max_length: int | None = None,
                 pad_id: int = 0, progress: str | None = None, bidirectional_context: bool = False
                 ) -> list[list[Score]]:
    """Scores for every continuation of every group, in input order. ``bidirectional_context``: score as a
    prefix LM (UL2R), the context attended in both directions, the continuation causally."""
    max_length = max_length or model.cfg.max_position_embeddings
    rows = _rows(groups, max_length)
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))  # longest first: padding stays small
    results: list[list[Score | None]] = [[None] * len(g.continuations) for g in groups]
    bar = tqdm(total=len(rows), desc=progress, unit="seq", disable=progress is None, leave=False)
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start:start + batch_size]]
        ids, positions, mask, picks = _pack(batch, pad_id, bidirectional_context)
        dev = model.device
        hidden = model.features(ids.to(dev), positions.to(dev), attn_mask=mask.to(dev))
        r_idx = torch.tensor([p[0] for p in picks], device=dev)
        s_idx = torch.tensor([p[1] for p in picks], device=dev)
        targets = torch.tensor([p[2] for p in picks], device=dev)
        logits = model.head(hidden[r_idx, s_idx]).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        token_lp = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        token_greedy = (logits.argmax(-1) == targets).tolist()
        at = 0
        for row in batch:
            for i, cont in row.conts:
                n = len(cont)
                results[row.group][i] = Score(sum(token_lp[at:at + n]), all(token_greedy[at:at + n]), n)
                at += n
        bar.update(len(batch))
    bar.close()
    return results  # type: ignore[return-value]


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[Group]:
    """Disjoint windows that predict every token of a document once (lm-evaluation-harness's scheme):
    the first window starts from ``prefix_token``; each later one predicts up to ``max_length`` tokens
    and is given the tokens before it that still fit the window as context."""
    groups = [Group([prefix_token], [tokens[:max_length]])]
    done = len(groups[0].continuations[0])
    while done < len(tokens):
        end = min(done + max_length, len(tokens))
        groups.append(Group(tokens[max(0, end - max_length - 1):done], [tokens[done:end]]))
        done = end
    return groups
