"""Real-model checks on SmolLM2-135M-Instruct (Llama architecture, chat format), prepared by
`scripts/prepare_model.py --model smollm2-135m`. Slow; CI runs them."""
import json
from pathlib import Path

import pytest
import torch

MODEL = Path(".cache/models/smollm2-135m-instruct")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (MODEL / "config.json").exists(),
                                 reason=f"{MODEL} is absent: run `scripts/prepare_model.py --model smollm2-135m` first")]

# SmolLM2-Instruct's own template (HuggingFaceTB/SmolLM2-135M-Instruct, tokenizer_config.json)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MSGS = [{"role": "system", "content": "You are Francisco in Shakespeare's Hamlet. Bernardo speaks to you; "
                                      "answer in character."},
        {"role": "user", "content": "Who's there?"},
        {"role": "assistant", "content": "Nay, answer me: stand, and unfold yourself."}]


@pytest.fixture(scope="module")
def nf4_model():
    from lowbit.models import load_model
    return load_model(MODEL, compute_dtype="float32", progress=False)  # fp32: exact merge parity below


@pytest.fixture(scope="module")
def example(nf4_model, tmp_path_factory):
    """MSGS through the trainer's data path (data.format=chat), one example per conversation."""
    from lowbit.recipes.config import DataConfig
    from lowbit.recipes.data import build_examples
    _, tok = nf4_model
    f = tmp_path_factory.mktemp("chat") / "one.jsonl"
    f.write_text(json.dumps({"messages": MSGS}) + "\n")
    (ex,) = build_examples([str(f)], tok, DataConfig(format="chat", max_seq_len=256, packing=False))
    return ex


def test_tokenizer_is_smollm2_chatml(nf4_model):
    _, tok = nf4_model
    assert tok.chat_template == CHATML
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", 1, "<|im_end|>", 2)
    assert tok.pad_token_id == 2 and tok("Good morrow").input_ids == tok("Good morrow", add_special_tokens=False).input_ids
    want = ("<|im_start|>system\nYou are Francisco in Shakespeare's Hamlet. Bernardo speaks to you; answer in "
            "character.<|im_end|>\n<|im_start|>user\nWho's there?<|im_end|>\n<|im_start|>assistant\n"
            "Nay, answer me: stand, and unfold yourself.<|im_end|>\n")
    assert tok.apply_chat_template(MSGS, tokenize=False) == want
    # no system turn: the template adds SmolLM's default one, as the original does
    assert tok.apply_chat_template(MSGS[1:2], tokenize=False, add_generation_prompt=True).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_chat_example_matches_template_and_labels_only_the_assistant(nf4_model, example):
    from lowbit.utils.batching import IGNORE_INDEX
    _, tok = nf4_model
    ids, labels = list(example["input_ids"]), list(example["labels"])
    assert ids == tok.apply_chat_template(MSGS, tokenize=True, return_dict=False)  # what transformers renders
    assert ids == tok(tok.apply_chat_template(MSGS, tokenize=False), add_special_tokens=False).input_ids
    prompt = tok.apply_chat_template(MSGS[:2], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[:len(prompt)] == prompt and all(x == IGNORE_INDEX for x in labels[:len(prompt)])
    assert labels[len(prompt):] == ids[len(prompt):]  # every token after the prompt is learned...
    assert tok.decode(labels[len(prompt):]) == "Nay, answer me: stand, and unfold yourself.<|im_end|>\n"
    assert tok.eos_token_id in labels  # ...including the end of turn, so the model learns to stop


def test_nf4_is_close_to_the_dense_model(nf4_model, example):
    from transformers import AutoModelForCausalLM
    model, _ = nf4_model
    dense = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    x, y = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    with torch.no_grad():
        l_dense, l_nf4 = dense(input_ids=x, labels=y).loss.item(), model(input_ids=x, labels=y).loss.item()
    # NF4 on top of the GGUF's Q4_1 costs a little; a broken loader (e.g. Q/K permutation) costs several nats
    assert l_dense < 6 and abs(l_nf4 - l_dense) < 1.0, (l_dense, l_nf4)


def test_qlora_steps_lower_the_loss_and_merge_matches(nf4_model, example, tmp_path):
    from lowbit.export.merge import merge, merge_tolerance
    from lowbit.modules.lora import add_lora
    from lowbit.utils.hashing import model_folder_hash
    from lowbit.utils.io import write_json
    model, tok = nf4_model
    torch.manual_seed(0)
    pm = add_lora(model, r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    x, y = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(3):  # one conversation, lr 2e-3: ~4.5 → ~1.5 nats
        loss = pm(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    # merge: the trained adapter folded into the dequantized NF4 base gives the adapter model's logits
    pm.eval()
    run = tmp_path / "run"
    pm.save_pretrained(run / "adapter")
    write_json(run / "lowbit_run.json", {
        "format": "lowbit.run", "version": 1,
        "config": {"model": {"path": str(MODEL), "quant": {"quant_type": "nf4", "blocksize": 64, "double_quant": True,
                                                            "skip_modules": ["lm_head"]}},
                   "lora": {"r": 8, "alpha": 16, "init": "zero"}},
        "base_model": {"path": str(MODEL), "sha256": model_folder_hash(MODEL), "model_type": "llama"}})
    with torch.no_grad():
        ref = pm(input_ids=x).logits
    merge(run, tmp_path / "merged", dtype="float32", verify=False, progress=False)  # verified here, on x
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert merged.config.tie_word_embeddings and "quantization_config" not in merged.config.to_dict()
    with torch.no_grad():
        got = merged(input_ids=x).logits
        with pm.disable_adapter():
            untrained = pm(input_ids=x).logits
    diff = (got - ref).abs().max().item()
    assert diff <= merge_tolerance(torch.float32, ref), diff
    assert (untrained - ref).abs().max().item() > 100 * diff  # the merge carried the trained adapter
