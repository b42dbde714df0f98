"""BFD-packed rows (TRL's packer) with lowbit's document-isolating collator: each document's loss in a
packed batch equals its loss alone, under sdpa and eager attention, with and without sliding-window layers."""
import datasets
import pytest
import torch
import torch.nn.functional as F
from trl import pack_dataset

from lowbit.recipes.loss import nll_sum
from lowbit.testing import make_tiny_model
from lowbit.utils.batching import IGNORE_INDEX, Collator, collate


def _docs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 400, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _per_token_nll(model, batch):
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    y = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none",
                          ignore_index=IGNORE_INDEX)
    return nll.view(y.shape)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_document_losses_equal_unpacked(arch, impl):
    model, tok = make_tiny_model(arch)
    model.config._attn_implementation = impl
    if arch == "gemma3":
        model.config.sliding_window = 8  # shorter than the packed rows: the window must hold inside each document
    model.eval()
    docs = _docs()
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": docs, "labels": docs}), 32, "bfd")
    rows = list(packed)
    assert sum(len(r["seq_lengths"]) for r in rows) == len(docs) and len(rows) < len(docs)
    batch = Collator(tok.pad_token_id, model.config)(rows)
    assert batch["position_ids"].max() < 20
    with torch.no_grad():
        got = _per_token_nll(model, batch)
        want = {}
        for d in docs:
            single = collate([{"input_ids": d, "labels": d}], tok.pad_token_id)
            want[tuple(d)] = _per_token_nll(model, single)[0]
    for i, r in enumerate(rows):
        start = 0
        for n in r["seq_lengths"]:
            doc = tuple(r["input_ids"][start:start + n])
            # position start+j predicts token start+j+1 of the same document; the last one predicts nothing
            torch.testing.assert_close(got[i, start:start + n - 1], want[doc], atol=2e-5, rtol=2e-5)
            start += n


def test_position_ids_alone_do_not_isolate_documents():
    """Why the collator builds a mask: restarting position ids is not enough under sdpa."""
    model, tok = make_tiny_model("llama")
    model.eval()
    a, b = _docs(2, seed=1)
    packed = {"input_ids": torch.tensor([a + b]), "position_ids": torch.tensor([list(range(len(a))) +
                                                                               list(range(len(b)))])}
    with torch.no_grad():
        together = model(**packed).logits[0, len(a):]
        alone = model(input_ids=torch.tensor([b])).logits[0]
    assert (together - alone).abs().max() > 1e-2


def test_chunked_loss_reads_the_packed_mask():
    model, tok = make_tiny_model("llama")
    docs = _docs(4, seed=2)
    rows = list(pack_dataset(datasets.Dataset.from_dict({"input_ids": docs, "labels": docs}), 64, "bfd"))
    b = Collator(tok.pad_token_id, model.config)(rows)
    with torch.no_grad():
        total, n = nll_sum(model, b["input_ids"], b["labels"], b["attention_mask"], 16, b["position_ids"])
        ref_total, ref_n = 0.0, 0
        for d in docs:
            s = collate([{"input_ids": d, "labels": d}], tok.pad_token_id)
            t, c = nll_sum(model, s["input_ids"], s["labels"], s["attention_mask"], 16)
            ref_total, ref_n = ref_total + t.item(), ref_n + c
    assert n == ref_n and total.item() == pytest.approx(ref_total, rel=1e-5)
