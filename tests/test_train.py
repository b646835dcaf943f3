"""The training engine: exact resume after SIGKILL, DDP / FSDP equal to one process, document masks,
atomic checkpoints, schedules, and a trained model that transformers opens with the same logits."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slmkit.errors import SlmError
from slmkit.train.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from slmkit.train.config import config_from_dict, load_config
from slmkit.train.metrics import COLUMNS, read_metrics
from slmkit.train.schedule import lr_at

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
TINY_MODEL = {"hidden_size": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 128,
              "max_position_embeddings": 128}


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory):
    """A 512-token BPE and packed shards of one real corpus file (the inaugural addresses)."""
    from slmkit.train.bpe import train_bpe
    from slmkit.train.corpus import prepare_corpus

    root = tmp_path_factory.mktemp("prepared")
    corpus = [str(shared_data / "pretrain_corpus" / "nltk_inaugural.jsonl")]
    train_bpe(corpus, root / "tokenizer", vocab_size=512)
    prepare_corpus(corpus, root / "tokenizer", root / "data", workers=1, val_fraction=0.1, progress=False)
    return root


def write_config(path: Path, prepared: Path, out: Path, **run) -> Path:
    raw = {
        "task": "pretrain", "out_dir": str(out),
        "model": {"init": "scratch", "tokenizer": str(prepared / "tokenizer"), "config": TINY_MODEL},
        "data": {"shards": str(prepared / "data"), "seq_len": 64},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3},
        "run": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": 8, "eval_every": 4, "save_every": 4,
                "threads": 1, "progress": False, **run},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def slm(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmkit", *args], capture_output=True, text=True, timeout=600, **kw)


def losses(out: Path) -> list[float]:
    rows = read_metrics(out / "metrics.csv")
    assert rows[0]["step"] == 0 and rows[0]["loss"] is None and rows[0]["val_loss"] > 0  # the starting point
    rows = rows[1:]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "steps missing or repeated"
    return [r["loss"] for r in rows]


# ---------------------------------------------------------------- schedules
def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine")
    assert lr_at(0, 100, **kw) == pytest.approx(1e-4)
    assert lr_at(9, 100, **kw) == pytest.approx(1e-3)
    assert lr_at(10, 100, **kw) == pytest.approx(1e-3)
    middle = 10 + (100 - 10 - 1) / 2
    assert lr_at(int(middle), 100, **kw) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * int(middle - 10) / 89)))
    assert lr_at(99, 100, **kw) == pytest.approx(1e-4)


def test_wsd_schedule_is_flat_then_decays_over_the_last_fraction():
    kw = dict(lr=1e-3, min_lr=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    assert [lr_at(s, 100, **kw) for s in (5, 40, 79)] == [1e-3] * 3
    assert lr_at(80, 100, **kw) == pytest.approx(1e-3 * 19 / 20)
    assert lr_at(99, 100, **kw) == pytest.approx(0.0)


# ---------------------------------------------------------------- precision
def test_precision_auto_takes_bf16_only_where_it_is_native(monkeypatch, capsys):
    from slmkit.train import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "fast_bf16", lambda device: False)
    assert precision.resolve_precision("auto", cpu) == "fp32"
    assert precision.resolve_precision("fp32", cpu) == "fp32"
    assert precision.resolve_precision("bf16", cpu) == "bf16"  # as asked, with a warning
    assert "no native bf16" in capsys.readouterr().err
    monkeypatch.setattr(precision, "fast_bf16", lambda device: True)
    assert precision.resolve_precision("auto", cpu) == "bf16"
    precision.resolve_precision("bf16", cpu)
    assert "warning" not in capsys.readouterr().err
    assert config_from_dict({"run": {"max_steps": 1, "precision": "auto"}}).run.precision == "auto"


# ---------------------------------------------------------------- config errors
def test_config_names_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(SlmError, match="unknown key.*lrr"):
        config_from_dict({"optim": {"lrr": 1}, "run": {"max_steps": 1}})
    with pytest.raises(SlmError, match="precision"):
        config_from_dict({"run": {"max_steps": 1, "precision": "fp8"}})
    with pytest.raises(SlmError, match="max_steps or run.max_tokens"):
        config_from_dict({})
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(SlmError, match="not valid YAML"):
        load_config(bad)
    result = slm("pretrain", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- checkpoints
def test_a_crash_while_writing_never_leaves_a_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 4, {"step": 4})
    real_save = torch.save

    def dies_midway(obj, f, *a, **kw):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 8, {"step": 8})
    monkeypatch.setattr(torch, "save", real_save)
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000004"]
    for step in (12, 16):
        save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000012", "step_00000016"]


def test_resume_after_sigkill_gives_the_same_losses(prepared, tmp_path):
    steps = 40
    straight = write_config(tmp_path / "a.yaml", prepared, tmp_path / "straight", max_steps=steps, save_every=3,
                            eval_every=10)
    result = slm("pretrain", str(straight))
    assert result.returncode == 0, result.stderr

    killed_out = tmp_path / "killed"
    killed = write_config(tmp_path / "b.yaml", prepared, killed_out, max_steps=steps, save_every=3, eval_every=10)
    proc = subprocess.Popen([sys.executable, "-m", "slmkit", "pretrain", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        found = latest_checkpoint(killed_out / "checkpoints")
        if found is not None and int(found.name[5:]) >= 9:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_out / "model").exists(), "the run finished before it could be killed"
    at_kill = len(read_metrics(killed_out / "metrics.csv"))
    assert at_kill < steps + 1

    forgot = slm("pretrain", str(killed))  # without --resume: refuses to start over the killed run
    assert forgot.returncode == 2 and "--resume" in forgot.stderr and "Traceback" not in forgot.stderr
    assert len(read_metrics(killed_out / "metrics.csv")) == at_kill

    result = slm("pretrain", str(killed), "--resume")
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(losses(killed_out), losses(tmp_path / "straight"), atol=1e-5, rtol=0)
    assert len(losses(killed_out)) == steps


def test_a_run_killed_before_its_first_checkpoint_starts_over_without_resume(prepared, tmp_path):
    """The killed run left metrics.csv rows (its step-0 evaluation and a few steps) but no checkpoint."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text(",".join(COLUMNS) + "\n0,0,,,,,9.9,1.0\n1,512,9.8,0.001,1.0,100.0,,2.0\n")
    config = write_config(tmp_path / "c.yaml", prepared, out, max_steps=4, save_every=4, eval_every=4)
    result = slm("pretrain", str(config))
    assert result.returncode == 0, result.stderr
    assert len(losses(out)) == 4
    assert read_metrics(out / "metrics.csv")[0]["val_loss"] != 9.9  # the old rows are gone


# ---------------------------------------------------------------- distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_trajectory(prepared, tmp_path, mode):
    single = write_config(tmp_path / "one.yaml", prepared, tmp_path / "one", grad_accum=2)
    assert slm("pretrain", str(single)).returncode == 0
    two = write_config(tmp_path / "two.yaml", prepared, tmp_path / "two", grad_accum=1, distributed=mode)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "slmkit", "pretrain", str(two)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), atol=1e-5, rtol=1e-5)
    val_one = [r["val_loss"] for r in read_metrics(tmp_path / "one" / "metrics.csv") if r["val_loss"] is not None]
    val_two = [r["val_loss"] for r in read_metrics(tmp_path / "two" / "metrics.csv") if r["val_loss"] is not None]
    np.testing.assert_allclose(val_two, val_one, atol=1e-5, rtol=1e-5)
    # the gathered model the main rank saved equals the single-process one
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "one" / "model" / "model.safetensors"), load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


# ---------------------------------------------------------------- objective
def test_document_mask_scores_each_document_as_if_alone():
    from slmkit.config import ModelConfig
    from slmkit.models.decoder import Decoder
    from slmkit.train.corpus import document_mask
    from slmkit.train.objectives import CausalLMLoss

    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=50, **TINY_MODEL))
    eos = 0
    docs = [[5, 6, 7, eos], [8, 9, 10, 11, 12, eos], [13, 14, 15]]
    stream = np.array([t for d in docs for t in d])
    pos, seg = document_mask(stream[:-1], eos)
    loss_module = CausalLMLoss(model)
    packed, n = loss_module(torch.tensor(stream[None, :-1]), torch.tensor(stream[None, 1:]),
                            torch.tensor(pos[None]), torch.tensor(seg[None]))
    # alone: each document scored by itself, plus the first token of the next one predicted from its EOS...
    # ...which the packed window scores from the EOS's own document context
    alone = torch.zeros(())
    flat = [t for d in docs for t in d]
    start = 0
    for d in docs:
        ids = torch.tensor(d)[None]
        logits = model(ids)
        targets = flat[start + 1:start + len(d) + 1]
        lp = logits[0, :len(targets)].log_softmax(-1)
        alone -= lp[torch.arange(len(targets)), torch.tensor(targets)].sum()
        start += len(d)
    assert n.item() == len(stream) - 1
    assert packed.item() == pytest.approx(alone.item(), rel=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    from slmkit.config import ModelConfig
    from slmkit.models.decoder import Decoder
    from slmkit.train.objectives import CausalLMLoss

    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=50, **TINY_MODEL)).train()
    ids = torch.randint(0, 50, (2, 17))
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        loss, _ = CausalLMLoss(model)(ids[:, :-1], ids[:, 1:])
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- outputs
def test_trained_model_opens_in_transformers_with_the_same_logits(prepared, tmp_path):
    transformers = pytest.importorskip("transformers")
    import slmkit

    cfg = write_config(tmp_path / "c.yaml", prepared, tmp_path / "run", max_steps=4, precision="bf16")
    result = slm("pretrain", str(cfg))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "run"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    lm = slmkit.load(out / "model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    ids = lm.tokenizer.encode("We the people of the United States, in order to form")
    with torch.no_grad():
        ours = lm.logits(ids)
        theirs = hf(torch.tensor([ids])).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    assert hf_tok("We the people")["input_ids"] == lm.tokenizer.encode("We the people")


def test_packed_chat_batches_score_like_padded_ones():
    """SFT packing (first-fit rows, positions restarting, block-diagonal attention) changes no loss."""
    from slmkit.config import ModelConfig
    from slmkit.models.decoder import Decoder
    from slmkit.train.chat_data import ChatDataset
    from slmkit.train.objectives import CausalLMLoss
    from slmkit.train.decoder_parts import ChatBatches

    rng = np.random.default_rng(0)
    examples = []
    for n in (9, 30, 14, 5, 22, 11):
        ids = rng.integers(1, 50, n).tolist()
        labels = [t if i >= n // 2 else -100 for i, t in enumerate(ids)]  # the "assistant" half
        examples.append({"input_ids": ids, "labels": labels})
    data = ChatDataset(examples)
    torch.manual_seed(0)
    loss_module = CausalLMLoss(Decoder(ModelConfig(vocab_size=50, **TINY_MODEL)))
    packed = ChatBatches(data, seed=0, pad_id=0, width=40, pack=True).batch(list(range(6)))
    padded = ChatBatches(data, seed=0, pad_id=0, width=40, pack=False).batch(list(range(6)))
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert int(packed.pop("tokens")) == int(padded.pop("tokens")) == sum(n - 1 for n in (9, 30, 14, 5, 22, 11))
    with torch.no_grad():
        a, na = loss_module(**packed)
        b, nb = loss_module(**padded)
    assert int(na) == int(nb)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_lora_chat_finetune_writes_an_adapter_peft_loads_and_the_merged_model(prepared, tmp_path, shared_data):
    """slm finetune with lora: on a tiny Llama (the prepared BPE's ChatML template) and real Alpaca records;
    the adapter opened by peft on the base gives the merged model's logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import json

    from slmkit.config import ModelConfig
    from slmkit.formats.hf import write_hf
    from slmkit.models.decoder import Decoder
    from slmkit.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_dir(prepared / "tokenizer")
    torch.manual_seed(0)
    base_cfg = ModelConfig(vocab_size=512, eos_token_id=0, bos_token_id=0, pad_token_id=0, **TINY_MODEL)
    base_dir = write_hf(tmp_path / "base", base_cfg, Decoder(base_cfg).state_dict(), tok)
    records = json.loads((shared_data / "instruction" / "llamafactory_alpaca_en_demo.json").read_text())[:40]
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(records))
    raw = {"task": "sft", "out_dir": str(tmp_path / "run"), "model": {"init": str(base_dir)},
           "data": {"chat": str(chat), "seq_len": 128, "val_fraction": 0.1},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q", "v", "down"]},
           "optim": {"lr": 1e-2, "warmup_steps": 1},
           "run": {"micro_batch_size": 4, "max_steps": 6, "eval_every": 3, "threads": 1, "progress": False}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(raw))
    result = slm("finetune", str(tmp_path / "sft.yaml"))
    assert result.returncode == 0, result.stderr
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # held-out assistant tokens: lower than untuned
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["down_proj", "q_proj", "v_proj"] and adapter["r"] == 4

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(hf_base, tmp_path / "run" / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("Give three tips for staying healthy.")])
    with torch.no_grad():
        a, b = with_adapter(ids).logits, merged(ids).logits
        base_logits = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)(ids).logits
    assert (a - b).abs().max().item() < 1e-4
    assert (a - base_logits).abs().max().item() > 1e-3  # the adapter learned something
