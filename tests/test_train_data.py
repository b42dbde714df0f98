import json

import pytest
import torch

from lowbit.errors import InputError
from lowbit.recipes.config import DataConfig
from lowbit.recipes.data import build_datasets, build_examples
from lowbit.recipes.loss import causal_lm_loss
from lowbit.testing import make_tokenizer
from lowbit.utils.batching import IGNORE_INDEX as IGNORE
from lowbit.utils.batching import Collator


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_text_is_packed_with_bos_and_eos(tok, tmp_path):
    (tmp_path / "a.txt").write_text("Fair is foul, and foul is fair.\nHover through the fog.")
    (tmp_path / "b.txt").write_text("When shall we three meet again?")
    ex = build_examples([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tok, DataConfig(max_seq_len=8))
    assert len(ex) > 2
    assert all(e["input_ids"][0] == tok.bos_token_id and e["input_ids"].count(tok.bos_token_id) == 1 for e in ex)
    stream = [t for e in ex for t in e["input_ids"][1:]]
    assert stream.count(tok.eos_token_id) >= 1  # first document's end is inside the packed stream
    assert all(len(e["input_ids"]) == 8 and e["labels"] == e["input_ids"] for e in ex)


def test_unpacked_text_is_one_example_per_document(tok, tmp_path):
    (tmp_path / "a.txt").write_text("Fair is foul.")
    (tmp_path / "b.txt").write_text("When shall we three meet again?")
    ex = build_examples([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tok, DataConfig(packing=False))
    assert len(ex) == 2 and all(e["input_ids"][0] == tok.bos_token_id and e["input_ids"][-1] == tok.eos_token_id
                                for e in ex)


def test_prompt_completion_masks_the_prompt(tok, tmp_path):
    f = tmp_path / "pc.jsonl"
    f.write_text(json.dumps({"prompt": "Who's there?", "completion": " Nay, answer me."}) + "\n")
    (e,) = build_examples([str(f)], tok, DataConfig(format="prompt_completion", max_seq_len=64))
    n_prompt = 1 + len(tok("Who's there?", add_special_tokens=False).input_ids)
    assert e["input_ids"][0] == tok.bos_token_id and e["input_ids"][-1] == tok.eos_token_id
    assert e["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert e["labels"][n_prompt:] == e["input_ids"][n_prompt:]


def test_chat_trains_on_assistant_turns_only(tok, tmp_path):
    msgs = [{"role": "user", "content": "Who is there?"}, {"role": "assistant", "content": "Bernardo."}]
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": msgs}) + "\n")
    (e,) = build_examples([str(f)], tok, DataConfig(format="chat", max_seq_len=128))
    labelled = [t for t, l in zip(e["input_ids"], e["labels"]) if l != IGNORE]
    assert tok.decode(labelled).strip().startswith("Bernardo.")
    assert "Who is there" not in tok.decode(labelled)


def test_missing_column_and_file(tok, tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(InputError, match=r"x.jsonl:1: no 'prompt' field \(fields: question, answer; name the column"):
        build_examples([str(f)], tok, DataConfig(format="prompt_completion"))
    with pytest.raises(InputError, match="does not exist"):
        build_examples([str(tmp_path / "none.txt")], tok, DataConfig())


def test_eval_fraction_split(tok):
    cfg = DataConfig(train_files=["lowbit/testing/data/macbeth_sample.txt"], eval_fraction=0.2, max_seq_len=32)
    train, evals = build_datasets(tok, cfg, seed=0)
    assert evals and len(evals) == int((len(train) + len(evals)) * 0.2)
    assert not {tuple(e["input_ids"]) for e in evals} & {tuple(e["input_ids"]) for e in train}


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_loss_equals_full_cross_entropy(softcap, tok):
    from lowbit.testing import make_tiny_model
    model, _ = make_tiny_model("gemma3" if softcap else "llama")
    model.config.final_logit_softcapping = softcap
    batch = Collator(tok.pad_token_id)([{"input_ids": list(range(5, 25)), "labels": list(range(5, 25))},
                                        {"input_ids": list(range(9, 20)), "labels": [IGNORE] * 3 + list(range(12, 20))}])
    ref = model(**batch).loss
    for chunk in (1, 7, 1024):
        got = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"], chunk_tokens=chunk)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_frozen_head_fused_gradient_equals_autograd(softcap):
    from lowbit.testing import make_tiny_model
    model, _ = make_tiny_model("gemma3" if softcap else "llama")  # gemma applies final_logit_softcapping
    model.config.final_logit_softcapping = softcap
    model.lm_head.weight.requires_grad_(False)
    ids = torch.randint(5, 500, (2, 24))
    labels = ids.clone()
    labels[0, :5] = IGNORE

    def grads(loss_fn):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ref_loss, ref = grads(lambda: model(input_ids=ids, labels=labels).loss)
    got_loss, got = grads(lambda: causal_lm_loss(model, ids, labels, chunk_tokens=7))
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert ref.keys() == got.keys() and len(got) > 5
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6)
