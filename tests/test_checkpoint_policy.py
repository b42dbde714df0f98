"""train.checkpoint_layers: checkpoint only as many decoder layers as the activation budget requires."""
import json

import torch

from lowbit.models import load_model
from lowbit.modules.lora import add_lora, decoder_layers, prepare_for_kbit_training, set_checkpointed_layers
from lowbit.recipes.trainer import checkpoint_plan


def _plan(path, budget):
    cfg = json.loads((path / "config.json").read_text())
    return checkpoint_plan(cfg, batch=4, seq=256, compute_dtype="float32", lora_r=16, lora_dropout=0.05,
                           budget_bytes=budget)


def test_plan_picks_fewest_layers_that_fit(tiny_model_dirs):
    path = tiny_model_dirs("llama")
    roomy, none = _plan(path, 2**40), _plan(path, 0)
    assert roomy["checkpointed"] == 0 and none["checkpointed"] == none["layers"]
    per, n = roomy["per_layer_bytes"], roomy["layers"]
    just = _plan(path, roomy["activation_bytes"] - 1)  # one byte short of keeping everything
    assert just["checkpointed"] >= 1 and just["activation_bytes"] <= just["budget_bytes"]
    assert roomy["activation_bytes"] == n * per
    kept = 4 * 4 * 256 * json.loads((path / "config.json").read_text())["hidden_size"]  # fp32 layer inputs
    assert _plan(path, n * kept + per)["checkpointed"] == n  # all checkpointed: inputs + one recomputed layer
    assert _plan(path, n * kept + per - 1)["checkpointed"] == n  # nothing smaller fits: still all


def test_partial_checkpointing_same_gradients(tiny_model_dirs, one_thread):
    grads = []
    for layers in (None, 1):
        model, _ = load_model(tiny_model_dirs("llama"), compute_dtype="float32", progress=False)
        prepare_for_kbit_training(model, gradient_checkpointing=True, checkpoint_layers=layers)
        flags = [m.gradient_checkpointing for m in decoder_layers(model)]
        assert flags == ([True] * len(flags) if layers is None else [True] + [False] * (len(flags) - 1))
        torch.manual_seed(0)
        pm = add_lora(model, r=4, alpha=8, dropout=0.0)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.data.fill_(0.01)
        pm.train()
        ids = torch.randint(0, 500, (2, 24))
        pm(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in pm.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7, msg=n)


def test_set_checkpointed_layers_spaces_evenly(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs("llama"), compute_dtype="float32", progress=False)
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    assert set_checkpointed_layers(model, 0) == [] and not any(m.gradient_checkpointing for m in decoder_layers(model))
    assert set_checkpointed_layers(model, 99) == list(range(len(decoder_layers(model))))
