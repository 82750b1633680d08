"""Padding-free packing (katdata.train_packing): the packed loss equals the unpacked loss on the same records.

Real KAT records, tokenized as `katdata train` does (katdata.train.encode), run through the embedded SmolLM2
in float32 once unpacked (a right-padded batch with an attention mask) and once packed (rows of several
records, position ids restarting per record, no attention mask). The completion-only labels survive packing
unchanged, and a change in one record leaves the logits of the records packed beside it untouched.
"""

from __future__ import annotations

import pytest

from katdata.chat_template import template_text
from katdata.train import encode
from katdata.train_packing import PackedCollator, attn_implementation, pack_rows, packed_dataset, position_ids

from demo_data import demo_records

MAX_LENGTH = 512


@pytest.fixture(scope="module")
def encs(tokenizer):
    records = demo_records(4, 4, seed=5)
    return [encode(tokenizer, r.messages(), template_text(training=True)) for r in records]


def tiny_llama(vocab: int, attn: str = "sdpa"):
    """A small random-init Llama (SmolLM2's architecture, fewer and narrower layers), float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      initializer_range=0.2, tie_word_embeddings=True, attn_implementation=attn)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def small(encs, tokenizer):
    """The records with their token ids renumbered densely (pad id 0), so the random model's vocabulary and
    logits stay small: the forward passes take a fraction of a second."""
    vocab = {tokenizer.pad_token_id: 0}
    for e in encs:
        for t in e["input_ids"]:
            vocab.setdefault(t, len(vocab))
    return [{"input_ids": [vocab[t] for t in e["input_ids"]],
             "labels": [vocab[t] if t != -100 else -100 for t in e["labels"]]} for e in encs], len(vocab)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, small):
    return tiny_llama(small[1], request.param).eval()


def token_losses(logits, labels):
    """Summed cross-entropy over label tokens (shifted) and their count."""
    import torch.nn.functional as F

    lab = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), lab.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((lab != -100).sum())


def unpacked_batch(encs, pad_id):
    import torch

    width = max(len(e["input_ids"]) for e in encs)
    ids = [e["input_ids"] + [pad_id] * (width - len(e["input_ids"])) for e in encs]
    labels = [e["labels"] + [-100] * (width - len(e["labels"])) for e in encs]
    mask = [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in encs]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def test_rows_keep_the_completion_mask_and_restart_positions(encs, tokenizer):
    rows = pack_rows(encs, MAX_LENGTH)
    assert len(rows) < len(encs)  # records do share rows
    assert sorted(n for r in rows for n in r["seq_lengths"]) == sorted(len(e["input_ids"]) for e in encs)
    by_ids = {tuple(e["input_ids"]): e for e in encs}
    for row in rows:
        assert len(row["input_ids"]) <= MAX_LENGTH
        start, labels = 0, []
        for n in row["seq_lengths"]:
            enc = by_ids[tuple(row["input_ids"][start:start + n])]  # each record whole and in one piece
            labels += enc["labels"]
            start += n
        assert row["labels"] == labels  # the mask is exactly the records' masks, concatenated
    batch = PackedCollator(tokenizer.pad_token_id)(rows[:2])
    assert "attention_mask" not in batch
    for b, row in enumerate(rows[:2]):
        n = len(row["input_ids"])
        assert batch["labels"][b, :n].tolist() == row["labels"]
        assert (batch["labels"][b, n:] == -100).all()
        pos, start = batch["position_ids"][b].tolist(), 0
        for length in row["seq_lengths"]:
            assert pos[start:start + length] == list(range(length))  # restarts at each record
            start += length
    assert position_ids([3, 2], 7) == [0, 1, 2, 0, 1, 0, 1]


@pytest.mark.parametrize("flat", [False, True], ids=["rows", "flat"])
def test_packed_loss_equals_unpacked_loss(small, model, flat):
    import torch

    encs = small[0]
    rows = pack_rows(encs, MAX_LENGTH)
    collator = PackedCollator(0, flat=flat)
    packed = collator(rows)
    unpacked = unpacked_batch(encs, 0)
    with torch.no_grad():
        out_u = model(**unpacked, use_cache=False)
        model_inputs = {k: v for k, v in packed.items() if k in ("input_ids", "labels", "position_ids")}
        out_p = model(**model_inputs, use_cache=False)  # as SFTTrainer.compute_loss
    sum_u, n_u = token_losses(out_u.logits, unpacked["labels"])
    sum_p, n_p = token_losses(out_p.logits, packed["labels"])
    assert n_u == n_p == sum(sum(x != -100 for x in e["labels"]) for e in encs)
    loss_u, loss_p = (sum_u / n_u).item(), (sum_p / n_p).item()
    print(f"\n{model.config._attn_implementation} {'flat' if flat else 'rows'}: unpacked loss {loss_u:.7f}, "
          f"packed loss {loss_p:.7f}, rel diff {abs(loss_p - loss_u) / loss_u:.2e} over {n_u} label tokens")
    assert loss_p == pytest.approx(loss_u, rel=1e-4)
    assert out_p.loss.item() == pytest.approx(out_u.loss.item(), rel=1e-4)  # the model's own loss agrees
    assert collator.tokens == sum(len(e["input_ids"]) for e in encs)


def test_no_attention_across_records(small, model):
    import torch

    row = next(r for r in pack_rows(small[0], MAX_LENGTH) if len(r["seq_lengths"]) >= 2)
    first = row["seq_lengths"][0]
    changed = dict(row, input_ids=list(row["input_ids"]))
    changed["input_ids"][first - 2] = (row["input_ids"][first - 2] + 1) % small[1]  # a token inside record A
    batch = PackedCollator(0)([row, changed])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    assert not torch.allclose(logits[0, first - 2], logits[1, first - 2])  # record A did see the change
    n = len(row["input_ids"])
    torch.testing.assert_close(logits[0, first:n], logits[1, first:n], rtol=0, atol=1e-5)  # the others did not



def test_sft_trainer_trains_on_packed_rows(encs, tokenizer, tmp_path):
    """The way katdata.train wires it: packing=False, the packed dataset and PackedCollator; TRL keeps the
    seq_lengths column and the batches reach the model with restarting position ids."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    assert attn_implementation("cpu") == "sdpa"
    model = tiny_llama(len(tokenizer))
    data = packed_dataset(encs, MAX_LENGTH)
    collator = PackedCollator(tokenizer.pad_token_id)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
                     logging_steps=1, save_strategy="no", report_to=[], max_length=MAX_LENGTH, packing=False,
                     dataloader_num_workers=0, disable_tqdm=True, use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         data_collator=collator, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                        task_type="CAUSAL_LM"))
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert int((batch["position_ids"] == 0).sum()) > batch["input_ids"].size(0)  # several records per row
    result = trainer.train()
    assert trainer.state.global_step == 1 and result.training_loss > 0


def test_katdata_train_packs(tmp_path):
    """`katdata train` with packing: true, the embedded model: real tokens counted (the
    pad-valued <|im_end|> inside records included), an adapter that trained."""
    import json

    import torch
    from safetensors.torch import load_file

    from katdata.runfiles import RowWriter
    from katdata.train import TrainConfig, run

    with RowWriter(tmp_path / "records.jsonl") as w:
        w.write_all(demo_records(0, 8, seed=5))
    stats = run(TrainConfig(holdout=2, max_steps=1, batch_size=2, max_length=512, warmup_steps=0, num_threads=1,
                            packing=True, learning_rate=5e-3), tmp_path)
    assert stats["steps"] == 1 and stats["input_tokens_seen"] > 0
    weights = load_file(tmp_path / "train" / "adapter" / "adapter_model.safetensors")
    assert any(torch.count_nonzero(v) for k, v in weights.items() if "lora_B" in k)
    assert json.loads((tmp_path / "train" / "train.json").read_text())["steps"] == 1
