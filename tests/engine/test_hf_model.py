"""A Hugging Face causal LM (a tiny Llama built from its config, nothing downloaded) that computes
its own loss: trained and evaluated through ``Task.forward_loss``, bit for bit as a plain loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.plain import plain_loop
from tests.helpers.runs import quiet_config
from traintel.run.api import build
from traintel.sinks.memory import MemorySink
from traintel.task import Task

pytestmark = pytest.mark.slow  # importing transformers alone takes seconds

VOCAB, PAD, IGNORE = 64, 0, -100
K = 3
TRAIN_ROWS = [[9, 4, 7], [3, 3], [12, 5, 8, 2], [6], [10, 10], [1, 9, 2], [7, 3]]
"""The lengths of each micro-batch's rows, right-padded to the longest: uneven items per batch."""
VAL_ROWS = [[8, 2], [5, 11, 4]]


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def lm_batches(rows: list[list[int]], seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in rows:
        width = max(lengths)
        tokens = torch.randint(3, VOCAB, (len(lengths), width), generator=g)
        mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
        out.append({
            "input_ids": tokens.masked_fill(mask == 0, PAD),
            "attention_mask": mask,
            "labels": tokens.masked_fill(mask == 0, IGNORE),
        })  # fmt: skip
    return out


def count_items(batch: dict[str, torch.Tensor]) -> int:
    """The tokens that have a loss: the model shifts the labels by one, so a row's first never counts."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def forward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def run(tmp_path: Path, **task: Any) -> tuple[MemorySink, torch.nn.Module]:
    model = tiny_llama()
    sink = MemorySink()
    config = quiet_config(tmp_path, accumulation_steps=K, optimizer={"name": "adamw", "lr": 0.01})
    build(config, Task(model=model, count_items=count_items, **task), sinks=[sink]).run()
    return sink, model


def test_a_causal_lm_trains_like_a_plain_loop(tmp_path: Path) -> None:
    batches = lm_batches(TRAIN_ROWS, seed=0)
    sink, model = run(tmp_path, forward_loss=forward_loss, train_loader=batches)

    reference = tiny_llama()
    opt = torch.optim.AdamW(reference.parameters(), lr=0.01)
    steps, _ = plain_loop(reference, batches, K, opt, loss=lambda b: reference(**b).loss, items=count_items)

    records = sink.of("train.step")
    assert [r.items for r in records] == [44, 32, 8]
    assert [r.loss for r in records] == steps
    pairs = list(zip(model.parameters(), reference.parameters(), strict=True))
    assert len(pairs) == 21 and all(torch.equal(p, r) for p, r in pairs)


def test_the_evaluation_is_the_mean_over_the_validation_tokens(tmp_path: Path) -> None:
    val = lm_batches(VAL_ROWS, seed=1)
    sink, model = run(
        tmp_path,
        forward_loss=lambda m, b: m(**b),
        train_loader=lm_batches(TRAIN_ROWS, seed=0),
        val_loader=val,
    )  # forward_loss may return the ModelOutput itself: its .loss is the loss

    model.eval()
    with torch.no_grad():
        raws = [float(model(**b).loss) for b in val]
        counts = [count_items(b) for b in val]
        token_losses = torch.cat([  # each counted token's loss, from the logits
            torch.nn.functional.cross_entropy(
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].flatten(0, 1),
                b["labels"][:, 1:].flatten(), ignore_index=IGNORE, reduction="none",
            )[b["labels"][:, 1:].flatten() != IGNORE]
            for b in val
        ])  # fmt: skip
    (evaluation,) = sink.of("eval.epoch")
    assert (evaluation.items, evaluation.batches) == (sum(counts), 2) == (len(token_losses), 2) == (25, 2)
    assert evaluation.loss == (raws[0] * counts[0] + raws[1] * counts[1]) / sum(counts)
    assert evaluation.loss == pytest.approx(float(token_losses.double().mean()), rel=1e-6)
