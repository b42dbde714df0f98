"""lowbit generate: first tokens, greedy prefix, sampling settings, shards, resume, determinism, bad input."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lowbit.errors import ConfigError, InputError
from lowbit.methods.data_gen import shards as shards_mod
from lowbit.methods.data_gen.config import SamplingConfig, load_generate_config
from lowbit.methods.data_gen.dataset import GeneratedDataset
from lowbit.methods.data_gen.runner import run
from lowbit.methods.data_gen.sampler import draw_starts, first_token_ids, generate_batch, sample_next
from lowbit.methods.data_gen.shards import MANIFEST, read_manifest, read_sequences
from lowbit.testing import make_tiny_model
from lowbit.utils.batching import collate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # conftest's: tiny models are per-op overhead, a second thread only adds wake-ups
    yield


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model("gemma3")


def _cfg(model_dir, out, *extra):
    return load_generate_config(None, [f"teacher.path={model_dir}", f"output.dir={out}", "teacher.dtype=float32",
                                       "teacher.device=cpu", "generate.num_sequences=10", "generate.batch_size=2",
                                       "output.shard_size=4", "generate.max_len=12", "generate.top_k=20",
                                       "output.progress=false", *extra])


def _logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


# ---- first token -------------------------------------------------------------------------------

def test_first_token_ids_exclude_special(tiny):
    _, tok = tiny
    ids = first_token_ids(tok, 512).tolist()
    assert set(tok.all_special_ids).isdisjoint(ids) and len(ids) == 512 - len(set(tok.all_special_ids))
    assert max(first_token_ids(tok, 300).tolist()) < 300  # model vocab smaller than the tokenizer


def test_first_token_uniform_distribution(tiny):
    _, tok = tiny
    allowed = first_token_ids(tok, 512)
    n = 20000
    _, first, n_greedy = draw_starts(list(range(n)), SamplingConfig(seed=3), allowed)
    assert set(first.tolist()) <= set(allowed.tolist())
    counts = torch.bincount(first, minlength=512)[allowed].float()
    expected = n / allowed.numel()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = allowed.numel() - 1
    assert abs(chi2 - dof) < 6 * (2 * dof) ** 0.5, chi2   # uniform: chi2 ~ dof +- sqrt(2 dof)
    assert sorted(set(n_greedy.tolist())) == [3, 4, 5]


def test_first_token_every_id(tiny):
    _, tok = tiny
    allowed = first_token_ids(tok, 512)
    _, first, _ = draw_starts(list(range(allowed.numel() + 3)), SamplingConfig(first_token="every_id"), allowed)
    assert first[:allowed.numel()].tolist() == allowed.tolist() and first[-3:].tolist() == allowed[:3].tolist()


# ---- greedy prefix and sampling ----------------------------------------------------------------

def test_greedy_prefix_equals_argmax(tiny):
    model, tok = tiny
    s = SamplingConfig(max_len=14, greedy_min=4, greedy_max=4, temperature=1.5, stop_at_eos=False)
    out = generate_batch(model, list(range(6)), s, first_token_ids(tok, 512), tok.bos_token_id, tok.eos_token_id)
    sampled_differs = 0
    for g in out:
        assert len(g.ids) == 14
        am = _logits_of(model, [tok.bos_token_id] + g.ids).argmax(-1).tolist()  # am[j] predicts x[j+1]
        # x = [BOS, first, g1..g4 greedy, ...]: tokens 1..4 after the first are argmax of the previous position
        assert g.ids[1:5] == am[1:5]
        sampled_differs += sum(a != b for a, b in zip(g.ids[5:], am[5:-1]))
    assert sampled_differs > 0  # at temperature 1.5 the sampled part is not just argmax


def test_all_greedy_sequence_is_argmax_chain(tiny):
    model, tok = tiny
    s = SamplingConfig(max_len=10, greedy_min=20, greedy_max=20, stop_at_eos=False)
    (g,) = generate_batch(model, [7], s, first_token_ids(tok, 512), tok.bos_token_id, tok.eos_token_id)
    am = _logits_of(model, [tok.bos_token_id] + g.ids).argmax(-1).tolist()
    assert g.ids[1:] == am[1:-1]


def test_sample_next_matches_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    rows = logits.expand(n, -1)

    def freq(**kw):
        return torch.bincount(sample_next(rows, u, **kw), minlength=6).float() / n

    for T in (0.5, 1.0, 2.0):
        assert torch.allclose(freq(temperature=T), torch.softmax(logits / T, 0), atol=0.012), T
    p = torch.softmax(logits[:2], 0)
    assert torch.allclose(freq(top_k=2), torch.cat([p, torch.zeros(4)]), atol=0.012)
    full = torch.softmax(logits, 0)            # [0.57, 0.21, 0.13, ...]: top_p=0.7 keeps the first 2, 0.8 the first 3
    for top_p, kept in ((0.5, 1), (0.7, 2), (0.8, 3)):
        want = torch.zeros(6)
        want[:kept] = full[:kept] / full[:kept].sum()
        assert torch.allclose(freq(top_p=top_p), want, atol=0.012), top_p
    # u at the very top never picks a token that top-p removed
    assert sample_next(logits[None], torch.tensor([1 - 1e-12]), top_p=0.7).item() in (0, 1)


def test_generate_honours_top_k_and_top_p(tiny):
    model, tok = tiny
    allowed = first_token_ids(tok, 512)
    s = SamplingConfig(max_len=12, greedy_min=0, greedy_max=0, top_k=3, temperature=3.0, stop_at_eos=False)
    for g in generate_batch(model, list(range(4)), s, allowed, tok.bos_token_id, tok.eos_token_id):
        top3 = _logits_of(model, [tok.bos_token_id] + g.ids).topk(3, -1).indices
        assert all(t in top3[j].tolist() for j, t in zip(range(1, len(g.ids)), g.ids[1:]))
    s = replace(s, top_k=0, top_p=1e-6)  # only the most likely token survives
    for g in generate_batch(model, list(range(4)), s, allowed, tok.bos_token_id, tok.eos_token_id):
        assert g.ids[1:] == _logits_of(model, [tok.bos_token_id] + g.ids).argmax(-1).tolist()[1:-1]


def test_stops_at_eos(tiny):
    model, tok = tiny
    allowed = first_token_ids(tok, 512)
    s = SamplingConfig(max_len=16, stop_at_eos=False, top_k=20)
    (full,) = generate_batch(model, [5], s, allowed, tok.bos_token_id, tok.eos_token_id)
    stop = full.ids[6]  # pretend this id is EOS: the same sequence must end at its first occurrence
    (cut,) = generate_batch(model, [5], replace(s, stop_at_eos=True), allowed, tok.bos_token_id, stop, topk=3)
    assert cut.ids == full.ids[:full.ids.index(stop) + 1]
    assert cut.topk_values.shape[0] == len(cut.ids)  # BOS + ids minus the last position


def test_sequence_does_not_depend_on_batch(tiny):
    model, tok = tiny
    s = SamplingConfig(max_len=12, top_k=50, top_p=0.95, stop_at_eos=False)
    allowed = first_token_ids(tok, 512)
    together = generate_batch(model, list(range(6)), s, allowed, tok.bos_token_id, tok.eos_token_id)
    alone = generate_batch(model, [4], s, allowed, tok.bos_token_id, tok.eos_token_id)
    assert alone[0].ids == together[4].ids
    other_seed = generate_batch(model, [4], replace(s, seed=1), allowed, tok.bos_token_id, tok.eos_token_id)
    assert other_seed[0].ids != alone[0].ids


# ---- shards, manifest, reader ------------------------------------------------------------------

def test_shard_rotation_and_manifest(tiny_model_dirs, tmp_path):
    out = tmp_path / "data"
    summary = run(_cfg(tiny_model_dirs("gemma3"), out))
    m = read_manifest(out)
    assert [(e["file"], e["first_index"], e["n_seqs"]) for e in m["shards"]] == [
        ("shard-00000.jsonl", 0, 4), ("shard-00001.jsonl", 4, 4), ("shard-00002.jsonl", 8, 2)]
    assert m["complete"] and m["total_sequences"] == 10 == summary["generated_sequences"]
    assert m["identity"]["teacher"]["hash"] and m["identity"]["settings"]["seed"] == 0
    assert m["metadata"]["config"]["generate"]["num_sequences"] == 10
    rows = [json.loads(x) for f in sorted(out.glob("shard-*.jsonl")) for x in f.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(10))
    seqs = list(read_sequences(out))
    assert seqs == [r["ids"] for r in rows] and m["total_tokens"] == sum(map(len, seqs))
    again = run(_cfg(tiny_model_dirs("gemma3"), out))  # complete: nothing left to do
    assert again["generated_sequences"] == 0 and again["skipped_sequences"] == 10


def test_same_seed_same_data(tiny_model_dirs, tmp_path):
    d = tiny_model_dirs("gemma3")
    run(_cfg(d, tmp_path / "a"))
    run(_cfg(d, tmp_path / "b"))
    run(_cfg(d, tmp_path / "c", "generate.seed=1"))
    a, b, c = (list(read_sequences(tmp_path / x)) for x in "abc")
    assert a == b and a != c
    assert (tmp_path / "a/shard-00001.jsonl").read_bytes() == (tmp_path / "b/shard-00001.jsonl").read_bytes()


def test_raising_num_sequences_extends_the_data(tiny_model_dirs, tmp_path):
    d = tiny_model_dirs("gemma3")
    run(_cfg(d, tmp_path / "a", "generate.num_sequences=6"))     # shards of 4 and 2
    run(_cfg(d, tmp_path / "a", "generate.num_sequences=10"))    # the short shard is regenerated, one added
    run(_cfg(d, tmp_path / "b"))
    assert list(read_sequences(tmp_path / "a")) == list(read_sequences(tmp_path / "b"))
    with pytest.raises(ConfigError, match="num_sequences"):
        run(_cfg(d, tmp_path / "a", "generate.num_sequences=4"))


def test_kill_and_resume(tiny_model_dirs, tmp_path):
    """SIGKILL a running `lowbit generate` mid-run, restart it: every sequence exactly once, and
    the same bytes as an uninterrupted run."""
    d = tiny_model_dirs("llama")
    out, ref = tmp_path / "killed", tmp_path / "ref"
    n = 120
    args = [f"teacher.path={d}", "teacher.dtype=float32", "teacher.device=cpu", f"generate.num_sequences={n}",
            "generate.batch_size=2", "output.shard_size=2", "generate.max_len=16", "output.topk_logits=3",
            "output.progress=false"]
    cmd = [sys.executable, "-m", "lowbit.cli", "generate", "--config",
           str(ROOT / "configs/llm_qat/generate-gemma3-270m.yaml")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd + args + [f"output.dir={out}"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        try:
            if len(read_manifest(out)["shards"]) >= 3:
                break
        except (InputError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.02)
    assert p.poll() is None, f"finished before it could be killed: {p.communicate()}"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    done_before = read_manifest(out)["total_sequences"]
    assert 0 < done_before < n
    r = subprocess.run(cmd + args + [f"output.dir={out}"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["skipped_sequences"] == done_before
    m = read_manifest(out)
    rows = [json.loads(x) for e in m["shards"] for x in (out / e["file"]).read_text().splitlines()]
    assert m["complete"] and m["total_sequences"] == n
    assert sorted(r["index"] for r in rows) == list(range(n))     # exact count, no duplicates
    assert not list(out.glob(".*.tmp"))
    run(load_generate_config(ROOT / "configs/llm_qat/generate-gemma3-270m.yaml", args + [f"output.dir={ref}"]))
    assert list(read_sequences(out)) == list(read_sequences(ref))
    for e in m["shards"]:
        assert (out / e["topk_file"]).read_bytes() == (ref / e["topk_file"]).read_bytes()


# ---- bad input -----------------------------------------------------------------------------------

def _digests(out):
    return {f.name: f.read_bytes() for f in out.iterdir() if f.name.startswith("shard-")}


def test_corrupt_shard_is_named_and_repairable(tiny_model_dirs, tmp_path):
    d, out = tiny_model_dirs("gemma3"), tmp_path / "data"
    run(_cfg(d, out, "output.topk_logits=2"))
    good = _digests(out)
    bad = out / "shard-00001.jsonl"
    bad.write_text(bad.read_text()[:-20])                # truncated
    with pytest.raises(InputError, match=r"shard 1 .*shard-00001.jsonl.*output.repair=true"):
        run(_cfg(d, out, "output.topk_logits=2"))
    with pytest.raises(InputError, match="shard 1"):
        list(read_sequences(out))
    after = _digests(out)
    assert {k: v for k, v in after.items() if k != bad.name} == {k: v for k, v in good.items() if k != bad.name}
    run(_cfg(d, out, "output.topk_logits=2", "output.repair=true"))
    assert _digests(out) == good                          # regenerated byte for byte
    (out / "shard-00002.topk.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="shard-00002.topk.safetensors"):
        GeneratedDataset(out, with_topk=True)


def test_disk_full_keeps_written_shards(tiny_model_dirs, tmp_path, monkeypatch):
    d, out = tiny_model_dirs("gemma3"), tmp_path / "data"
    real = shards_mod.atomic_path

    def full_on_shard_2(path, *a, **k):
        if Path(path).name == "shard-00002.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(shards_mod, "atomic_path", full_on_shard_2)
    with pytest.raises(InputError, match=r"shard 2 .*disk is full.*2 shard\(s\) already written are kept"):
        run(_cfg(d, out))
    m = read_manifest(out)
    assert [e["shard"] for e in m["shards"]] == [0, 1] and not m["complete"]
    assert len(list(read_sequences(out))) == 8            # verified against their checksums
    monkeypatch.setattr(shards_mod, "atomic_path", real)
    run(_cfg(d, out))
    assert len(list(read_sequences(out))) == 10


def test_output_dir_checks(tiny_model_dirs, tmp_path):
    d = tiny_model_dirs("gemma3")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        run(_cfg(d, other))
    run(_cfg(d, tmp_path / "data"))
    with pytest.raises(ConfigError, match=r"other settings \(settings.temperature: 1.0 -> 0.5"):
        run(_cfg(d, tmp_path / "data", "generate.temperature=0.5"))
    with pytest.raises(ConfigError, match="shard_size"):
        load_generate_config(None, [f"teacher.path={d}", "output.shard_size=5", "generate.batch_size=2"])
    with pytest.raises(ConfigError, match="did you mean 'generate.top_p'"):
        load_generate_config(None, [f"teacher.path={d}", "generate.topp=0.9"])


# ---- dataset reader --------------------------------------------------------------------------------

def test_dataset_blocks_and_topk_alignment(tiny_model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, out = tiny_model_dirs("gemma3"), tmp_path / "data"
    run(_cfg(d, out, "output.topk_logits=4"))
    tok = AutoTokenizer.from_pretrained(d)
    ds = GeneratedDataset(out, tokenizer=tok, with_topk=True)
    seqs = list(read_sequences(out))
    assert len(ds) == 10
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    for i in (0, 9):
        item = ds[i]
        assert item["input_ids"] == [tok.bos_token_id] + seqs[i] == item["labels"]
        top = _logits_of(model, item["input_ids"])[:-1].topk(4, -1)
        assert item["topk_indices"].shape == (len(item["input_ids"]) - 1, 4)
        torch.testing.assert_close(item["topk_values"].float(), top.values, atol=2e-3, rtol=1e-3)
        assert (item["topk_indices"].long() == top.indices).float().mean() > 0.95   # fp16 ties may swap
    short = GeneratedDataset(out, max_seq_len=5, with_topk=True)
    assert len(short[0]["input_ids"]) == 5 and short[0]["topk_values"].shape[0] == 4
    b = collate([ds[0], short[1]], pad_id=tok.pad_token_id)
    assert b["input_ids"].shape[0] == 2 and b["topk_values"].shape[:2] == (2, b["input_ids"].shape[1] - 1)
    assert (b["labels"][1, 5:] == -100).all() and b["attention_mask"][1].sum() == 5
    with pytest.raises(ConfigError, match="vocabulary mismatch"):
        GeneratedDataset(out, vocab_size=1000)
    small = type(tok).from_pretrained(d)
    small.add_tokens(["<extra_a>", "<extra_b>"])
    with pytest.raises(ConfigError, match="vocabulary mismatch"):
        GeneratedDataset(out, tokenizer=small)


def test_cli(tiny_model_dirs, tmp_path, capsys):
    from lowbit.cli import main
    cfg = ROOT / "configs/llm_qat/generate-gemma3-270m.yaml"
    d = tiny_model_dirs("qwen2")
    rc = main(["generate", "--config", str(cfg), f"teacher.path={d}", f"output.dir={tmp_path / 'o'}",
               "generate.num_sequences=4", "generate.batch_size=4", "output.shard_size=4", "generate.max_len=8",
               "output.topk_logits=2", "output.progress=false"])
    assert rc == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generated_sequences"] == 4
    assert (tmp_path / "o" / MANIFEST).exists()
    assert main(["generate", "--config", str(cfg), "generate.temprature=2"]) == 2
    assert "did you mean 'generate.temperature'" in capsys.readouterr().err
    assert main(["generate", "--config", str(cfg), f"teacher.path={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
