"""Data-free NF4 repair options: hidden-state distillation, online top-k, LoftQ calibrated on generated text."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import ConfigError, InputError
from lowbit.methods.loftq.calibration import TokenSequences, calibration_batches
from lowbit.recipes.config import load_config
from lowbit.recipes.distill import distill_loss, kd_loss
from lowbit.recipes.distill_hidden import hidden_state_loss, layer_indices

TINY = "configs/tiny/llama-qlora.yaml"


@pytest.fixture(scope="module")
def generated(tiny_generated):
    return tiny_generated("generate.stop_at_eos=false", "output.topk_logits=0")


def _states(n_layers=3, b=2, L=5, h=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(b, L, h, generator=g, dtype=torch.float64) * (i + 1) for i in range(n_layers + 1)]
    s = [(x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).requires_grad_() for x in t]
    return s, t


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_value_and_gradients_match_the_formula(kind):
    s, t = _states()
    keep = torch.tensor([[True, True, False, True, True], [True, False, True, True, False]])
    got = hidden_state_loss(s, t, keep, [1, 3], kind)

    def per_layer(a, b):
        a, b = a[keep], b[keep]
        if kind == "mse":
            return ((a - b) ** 2).sum() / (b ** 2).sum()
        return (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean()
    want = (per_layer(s[1], t[1]) + per_layer(s[3], t[3])) / 2
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-7)
    g_got = torch.autograd.grad(got, s, allow_unused=True)
    g_want = torch.autograd.grad(want, s, allow_unused=True)
    assert g_got[0] is None and g_got[2] is None  # unchosen layers get no gradient
    for i in (1, 3):
        torch.testing.assert_close(g_got[i], g_want[i].to(g_got[i].dtype), rtol=1e-4, atol=1e-7)
        assert g_got[i][~keep].abs().max() == 0  # positions left out carry no gradient
    # identical states: zero loss
    assert hidden_state_loss(t, t, keep, None, kind).item() == pytest.approx(0, abs=1e-6)


def test_hidden_state_loss_is_relative_and_layers_default_to_every_block():
    s, t = _states(n_layers=2)
    keep = torch.ones(2, 5, dtype=torch.bool)
    scaled = hidden_state_loss([10 * x for x in s], [10 * x for x in t], keep)
    torch.testing.assert_close(scaled, hidden_state_loss(s, t, keep), rtol=1e-5, atol=1e-7)  # scale-free
    assert layer_indices(3, []) == [1, 2]
    with pytest.raises(ConfigError, match=r"hidden_layers \[5\] out of range.*0\.\.2"):
        hidden_state_loss(s, t, keep, [1, 5])
    with pytest.raises(ConfigError, match="same depth"):
        hidden_state_loss(s[:2], t, keep)


def test_online_top_k_is_the_offline_loss_on_the_teacher_top_k():
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(9, 8, generator=g, dtype=torch.float64).requires_grad_()
    ws = torch.randn(40, 8, generator=g, dtype=torch.float64)
    th, tw = torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randn(40, 6, generator=g, dtype=torch.float64)
    v, i = (th @ tw.t()).topk(5, dim=-1)
    online = kd_loss(hs, ws, teacher_hidden=th, teacher_weight=tw, temperature=2.0, top_k=5, chunk_tokens=4)
    offline = kd_loss(hs, ws, topk_values=v, topk_indices=i, temperature=2.0, chunk_tokens=4)
    torch.testing.assert_close(online, offline, rtol=1e-6, atol=1e-7)
    full = kd_loss(hs, ws, teacher_hidden=th, teacher_weight=tw, temperature=2.0)
    torch.testing.assert_close(kd_loss(hs, ws, teacher_hidden=th, teacher_weight=tw, temperature=2.0, top_k=40), full)
    assert not torch.allclose(online, full)
    with pytest.raises(ConfigError, match="top_k"):
        kd_loss(hs, ws, topk_values=v, topk_indices=i, top_k=3)


def test_distill_loss_adds_the_weighted_hidden_term_on_a_model(tiny_model_dirs):
    from lowbit.models import load_model
    from lowbit.recipes.distill_hidden import decoder_states
    teacher, _ = load_model(tiny_model_dirs("llama"), load_in_4bit=False, compute_dtype="float32", progress=False)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.model.layers[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, 8:] = -100
    kd = distill_loss(student, ids, labels, teacher=teacher)
    both = distill_loss(student, ids, labels, teacher=teacher, hidden_weight=0.5, hidden_layers=[1, 2])
    keep = labels[:, 1:] != -100
    with torch.no_grad():
        s, t = decoder_states(student, ids)[1], decoder_states(teacher, ids)[1]
        hidden = hidden_state_loss([x[:, :-1] for x in s], [x[:, :-1] for x in t], keep, [1, 2])
    assert hidden > 0
    torch.testing.assert_close(both, kd + 0.5 * hidden, rtol=1e-5, atol=1e-6)
    both.backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    # a student equal to its teacher: KL and hidden term both vanish
    assert distill_loss(teacher, ids, labels, teacher=teacher, hidden_weight=1.0).item() == pytest.approx(0, abs=1e-5)
    with pytest.raises(ConfigError, match="online teacher"):
        distill_loss(student, ids, labels, topk_values=torch.zeros(2, 11, 2), topk_indices=torch.zeros(2, 11, 2),
                     hidden_weight=1.0)


@pytest.mark.parametrize("override, message", [
    (["distill.hidden_weight=0.5"], "distill.hidden_weight needs an online teacher"),
    (["distill.teacher=base", "distill.source=offline", "data.format=generated", "distill.hidden_weight=1"],
     "distill.hidden_weight needs an online teacher"),
    (["distill.top_k=8"], "distill.top_k needs an online teacher"),
    (["distill.teacher=base", "distill.hidden_layers=[1,-2]"], "hidden_layers must be indices >= 0"),
    (["distill.teacher=base", "distill.hidden_weight=-1"], "'distill.hidden_weight' must be >= 0"),
    (["distill.teacher=base", "distill.hidden_loss=l1"], "must be one of mse, cosine"),
])
def test_distill_config_errors_name_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, override)


def test_token_sequences_give_evenly_spaced_windows_and_clear_errors():
    seqs = [[1] + [10 + i] * (4 + i % 3) for i in range(10)]  # lengths 5, 6, 7, 5, ...
    src = TokenSequences(seqs, "gen (generated)")
    x = calibration_batches(None, src, n_samples=3, seq_len=6)
    long = [s for s in seqs if len(s) >= 6]  # 6 of them: picks 0, 2 (2.5 rounds to even), 5
    assert x.tolist() == [long[0][:6], long[2][:6], long[5][:6]] and str(src) == "gen (generated)"
    with pytest.raises(InputError, match="has 3 sequences of >= 7 tokens, 4 are asked for"):
        calibration_batches(None, src, n_samples=4, seq_len=7)


def test_loftq_calibrated_on_generated_shards_trains_with_hidden_distillation(generated, tmp_path):
    from lowbit.recipes import run
    d, data = generated
    out = tmp_path / "run"
    m = run(load_config(TINY, [
        f"model.path={d}", f"train.output_dir={out}", "train.max_steps=6", "train.lr=0.002", "data.format=generated",
        f"data.train_files=[{data}]", "data.eval_files=[lowbit/testing/data/macbeth_sample.txt]", "data.max_eval_blocks=4",
        "train.report_to=[jsonl]", "lora.init=loftq", "lora.loftq.iters=2", "lora.loftq.svd=full",
        f"lora.loftq.calibration={data}", "lora.loftq.calibration_samples=8", "lora.loftq.calibration_seq_len=20",
        "distill.teacher=base", "distill.hidden_weight=0.5"]))
    rec = json.loads((out / "lowbit_run.json").read_text())["loftq"]
    assert rec["metric"] == "activation" and rec["calibration"]["file"] == f"{data} (generated)"
    assert rec["calibration"]["tokens"] == 8 * 20
    assert rec["mean_loftq_error"] < rec["mean_zero_init_error"]
    losses = [json.loads(x)["loss"] for x in (out / "logs.jsonl").read_text().splitlines() if '"loss"' in x]
    # the loss includes the hidden term (>= 0) and training ran every step; that KD lowers the loss is
    # test_distill_train's check, here the LoftQ start is already close to the teacher
    assert len(losses) == 6 and all(0 <= v < 10 for v in losses)
    assert m["eval_ppl_after"] > 0 and m["train_steps"] == 6


def test_calibration_folder_without_manifest_is_one_clear_error(tiny_model_dirs, tmp_path):
    from lowbit.recipes import run
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is a folder without manifest.json"):
        run(load_config(TINY, [f"model.path={tiny_model_dirs('llama')}", f"train.output_dir={tmp_path / 'r'}",
                               "lora.init=loftq", f"lora.loftq.calibration={tmp_path / 'empty'}", "train.report_to=[]"]))


def test_cosine_and_mse_agree_on_direction():
    """Both distances fall when the student moves toward the teacher (a gradient step lowers them)."""
    s, t = _states(n_layers=1)
    keep = torch.ones(2, 5, dtype=torch.bool)
    for kind in ("mse", "cosine"):
        loss = hidden_state_loss(s, t, keep, [1], kind)
        g = torch.autograd.grad(loss, s[1])[0]
        stepped = [s[0], (s[1] - 0.1 * g / g.norm()).detach()]
        assert hidden_state_loss(stepped, t, keep, [1], kind) < loss
    assert F.cosine_similarity(t[1], t[1], dim=-1).min() > 0.999
