"""slmkit's Trainer takes the same optimizer steps as transformers' Trainer: a tiny Llama in fp32, the same
initial weights (written by slmkit's HF writer, opened by transformers), the same token windows in the same
order, AdamW with weight decay on matrices and embeddings only, gradient accumulation normalised by the
global batch's target tokens, clipping that triggers, and slmkit's cosine schedule with warmup.

transformers is handed slmkit's schedule (``lr_at``) as a ``LambdaLR``: its own ``cosine`` is a different
schedule (warm-up from 0 at step 0, so one step behind slmkit's, and a decay to 0 at step ``max_steps``
instead of to ``min_lr`` at the last step), see ``test_transformers_cosine_is_not_slmkits_schedule``.
Everything else is transformers' own: its optimizer, parameter groups, accumulation, loss count and clipping.
"""

from __future__ import annotations

import pytest
import torch

from slmkit.train.schedule import lr_at

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, MICRO, ACCUM, STEPS = 256, 32, 4, 2, 10
OPTIM = dict(lr=2e-2, min_lr=2e-3, warmup_steps=3)  # an lr this large drives the grad norm over the clip
TINY_LLAMA = dict(family="llama", vocab_size=VOCAB, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False)


def windows() -> torch.Tensor:
    """[samples, SEQ + 1] random walks over the vocabulary (each token 1-4 after the last, so there is
    something to learn): sample k is input k[:-1] with targets k[1:]."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, VOCAB, (MICRO * ACCUM * STEPS, 1), generator=g)
    steps = torch.randint(1, 5, (MICRO * ACCUM * STEPS, SEQ), generator=g)
    return torch.cat([start, start + steps.cumsum(1)], 1) % VOCAB


def slmkit_schedule(step: int, total: int) -> float:
    return lr_at(step, total, schedule="cosine", **OPTIM)


def train_slmkit(model, data: torch.Tensor, out) -> tuple[list[float], list[float]]:
    from slmkit.train.config import DataSection, OptimSection, RunSection, TrainConfig
    from slmkit.train.distributed import Dist
    from slmkit.train.trainer import Trainer

    class Windows:  # a BatchSource: global sample indices -> a batch
        def batch(self, indices):
            w = data[indices]
            return {"input_ids": w[:, :-1], "labels": w[:, 1:]}

    cfg = TrainConfig(
        task="pretrain", out_dir=str(out), data=DataSection(seq_len=SEQ),
        optim=OptimSection(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=1.0, schedule="cosine",
                           **OPTIM),
        run=RunSection(micro_batch_size=MICRO, grad_accum=ACCUM, max_steps=STEPS, precision="fp32",
                       device="cpu", progress=False))
    trainer = Trainer(model, Windows(), cfg, Dist())
    trainer.loss_module.train()
    losses, norms = [], []
    for step in range(STEPS):
        loss, norm, _ = trainer.train_step(step)
        losses.append(loss)
        norms.append(norm)
    return losses, norms


def train_transformers(init_dir, data: torch.Tensor, out) -> tuple[list[float], list[float]]:
    from torch.optim.lr_scheduler import LambdaLR

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, k):
            return {"input_ids": data[k, :-1], "labels": data[k, 1:]}

    class ShiftedLlama(transformers.LlamaForCausalLM):
        """Labels arrive already shifted (as slmkit's batches do): score them position by position, summed and
        divided by the Trainer's count of target tokens in the whole accumulated batch."""

        def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kw):
            out = super().forward(input_ids=input_ids, **kw)
            loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(),
                                                     reduction="sum")
            out.loss = loss / (num_items_in_batch if num_items_in_batch is not None else labels.numel())
            return out

    class InOrder(transformers.Trainer):
        def _get_train_sampler(self, *a, **kw):  # slmkit's order: step s takes samples s*G .. s*G+G-1
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = LambdaLR(optimizer if optimizer is not None else self.optimizer,
                                             lambda s: slmkit_schedule(s, num_training_steps) / OPTIM["lr"])
            return self.lr_scheduler

    model = ShiftedLlama.from_pretrained(init_dir, dtype=torch.float32)
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
        max_steps=STEPS, learning_rate=OPTIM["lr"], weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_drop_last=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = InOrder(model=model, args=args, train_dataset=Windows())
    trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    return [row["loss"] for row in logs], [row["grad_norm"] for row in logs]


@pytest.mark.slow  # two short training runs: 15-40 s here
def test_losses_match_transformers_trainer_step_for_step(tmp_path):
    from slmkit.config import ModelConfig
    from slmkit.formats.hf import write_hf
    from slmkit.models.decoder import Decoder

    cfg = ModelConfig(**TINY_LLAMA)
    torch.manual_seed(0)
    model = Decoder(cfg)
    for p in model.parameters():  # slmkit's scratch init: N(0, 0.02) matrices and embeddings, unit norms
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.02)
    init_dir = write_hf(tmp_path / "init", cfg, model.state_dict())  # before slmkit trains it in place
    data = windows()

    ours, our_norms = train_slmkit(model, data, tmp_path / "slmkit")
    theirs, their_norms = train_transformers(init_dir, data, tmp_path / "hf")

    assert len(ours) == len(theirs) == STEPS
    assert max(our_norms) > 1.0, f"clipping never triggered: grad norms {our_norms}"
    assert ours[-1] < ours[0] - 0.5  # it trains
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: slmkit {a:.6f} vs transformers {b:.6f}\n{ours}\n{theirs}"
    torch.testing.assert_close(torch.tensor(our_norms), torch.tensor(their_norms), rtol=1e-3, atol=0)


def test_transformers_cosine_is_not_slmkits_schedule():
    """Why the parity run hands transformers ``lr_at``: its ``cosine`` starts at 0 (one warm-up step behind
    slmkit's, whose first step already takes lr / warmup) and ends at 0 rather than min_lr."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=OPTIM["lr"])
    sched = transformers.get_scheduler("cosine", optimizer=opt, num_warmup_steps=OPTIM["warmup_steps"],
                                       num_training_steps=STEPS)
    theirs = []
    for _ in range(STEPS):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [slmkit_schedule(s, STEPS) for s in range(STEPS)]
    w = OPTIM["warmup_steps"]
    assert theirs[0] == 0.0 and ours[0] == pytest.approx(OPTIM["lr"] / w)
    assert theirs[1:w + 1] == pytest.approx(ours[:w])  # the same ramp, one step later
    assert ours[-1] == pytest.approx(OPTIM["min_lr"]) and theirs[-1] < OPTIM["min_lr"]
