"""Data through `datasets`: bad rows named by file and line (or skipped and counted), every source kind,
weighted mixtures with per-dataset formats, packing for chat and prompt-completion, streaming."""
import json

import datasets
import pytest

from lowbit.errors import ConfigError, InputError
from lowbit.recipes.config import DataConfig, DatasetSpec, load_config
from lowbit.recipes.data import build_datasets, build_examples, train_dataset
from lowbit.testing import make_tokenizer
from lowbit.utils.batching import IGNORE_INDEX

CHAT = {"messages": [{"role": "user", "content": "Who is there?"}, {"role": "assistant", "content": "Bernardo."}]}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("row,fmt,message", [
    ('{"prompt": "a", "completion": ', "prompt_completion", r"bad.jsonl:2: not valid JSON"),
    ({"messages": [{"role": "user"}]}, "chat", r"bad.jsonl:2: message 0 has no role/content"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "narrator", "content": "y"}]}, "chat",
     r"bad.jsonl:2: message 1 has role 'narrator'"),
    ({"prompt": "Who's there?", "completion": "  "}, "prompt_completion", r"bad.jsonl:2: 'completion' is empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "chat", r"bad.jsonl:2: no assistant turn"),
])
def test_bad_row_is_one_line_naming_file_and_line(tok, tmp_path, row, fmt, message):
    good = CHAT if fmt == "chat" else {"prompt": "Who's there?", "completion": "Nay, answer me."}
    f = _jsonl(tmp_path / "bad.jsonl", [good, row, good])
    with pytest.raises(InputError, match=message + r".*data.on_bad_rows=skip"):
        build_examples([str(f)], tok, DataConfig(format=fmt))


def test_role_order_the_template_rejects(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                         "{{ m['content'] }}{% endfor %}")
    f = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(InputError, match=r"c.jsonl:1: the chat template rejects this conversation: roles must alt"):
        build_examples([str(f)], tok, DataConfig(format="chat"))


def test_skip_drops_and_counts_bad_rows(tok, tmp_path, capsys):
    f = _jsonl(tmp_path / "s.jsonl", [CHAT, "{broken", {"messages": []}, CHAT])
    ex = build_examples([str(f)], tok, DataConfig(format="chat", on_bad_rows="skip", packing=False))
    assert len(ex) == 2
    out = capsys.readouterr().out
    assert "skipped 2 bad data rows" in out and "s.jsonl:2: not valid JSON" in out


def test_every_source_kind(tok, tmp_path):
    rows = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(5)]
    jl = _jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    cfg = DataConfig(format="prompt_completion", packing=False)
    want = build_examples([str(jl)], tok, cfg)
    for src in ("a.json", "a.parquet", "disk"):
        assert build_examples([str(tmp_path / src)], tok, cfg) == want, src
    with pytest.raises(InputError, match=r"a.json row 2: 'completion' must be a string"):
        (tmp_path / "a.json").write_text(json.dumps([rows[0], {"prompt": "q", "completion": 3}]))
        build_examples([str(tmp_path / "a.json")], tok, cfg)


def test_chat_and_prompt_completion_are_bfd_packed(tok, tmp_path):
    f = _jsonl(tmp_path / "c.jsonl", [CHAT] * 12)
    cfg = DataConfig(format="chat", train_files=[str(f)], max_seq_len=128)
    packed = list(train_dataset(tok, cfg))
    assert len(packed) < 12 and sum(len(r["seq_lengths"]) for r in packed) == 12
    assert all(len(r["input_ids"]) <= 128 and len(r["labels"]) == len(r["input_ids"]) for r in packed)
    assert any(label != IGNORE_INDEX for r in packed for label in r["labels"])


def test_weighted_mixture_with_per_dataset_formats(tok, tmp_path):
    chat = _jsonl(tmp_path / "chat.jsonl", [CHAT] * 40)
    qa = _jsonl(tmp_path / "qa.jsonl", [{"q": f"Question {i}?", "a": " Yes."} for i in range(40)])
    cfg = DataConfig(packing=False, datasets=[
        DatasetSpec(files=[str(chat)], format="chat", weight=3.0),
        DatasetSpec(files=[str(qa)], format="prompt_completion", weight=1.0, prompt_field="q", completion_field="a")])
    mixed = list(train_dataset(tok, cfg, seed=1))
    n_chat = sum("Bernardo" in tok.decode(r["input_ids"]) for r in mixed)
    assert 0 < len(mixed) - n_chat < n_chat  # both present, chat drawn ~3x as often


def test_streaming_reads_lazily(tok, tmp_path):
    f = _jsonl(tmp_path / "c.jsonl", [CHAT] * 8)
    cfg = DataConfig(format="chat", train_files=[str(f)], streaming=True, packing=False)
    ds = train_dataset(tok, cfg)
    assert isinstance(ds, datasets.IterableDataset)
    assert len(list(ds)) == 8


def test_data_config_refusals_before_any_model():
    with pytest.raises(ConfigError, match="data.streaming=true .* set train.max_steps"):
        load_config(None, ["data.streaming=true", "data.train_files=[x.jsonl]"])
    with pytest.raises(ConfigError, match="train.method=dpo trains on data.format preference"):
        load_config(None, ["train.method=dpo", "data.format=chat"])
    with pytest.raises(ConfigError, match="grpo.reward_funcs: cannot import 'nope.mod:f'"):
        load_config(None, ["train.method=grpo", "data.format=prompt", "grpo.reward_funcs=[nope.mod:f]"])
    with pytest.raises(ConfigError, match="grpo.num_generations=3 must divide"):
        load_config(None, ["train.method=grpo", "data.format=prompt", "grpo.num_generations=3",
                           "grpo.reward_funcs=[lowbit.testing.rewards:letter_e]"])


def test_eval_split_from_train(tok, tmp_path):
    f = _jsonl(tmp_path / "c.jsonl", [CHAT] * 20)
    train, ev = build_datasets(tok, DataConfig(format="chat", train_files=[str(f)], packing=False,
                                               eval_fraction=0.25), seed=0)
    assert len(train) == 15 and len(ev) == 5 and isinstance(ev, list)


def test_streaming_with_bfd_packing(tok, tmp_path):
    f = _jsonl(tmp_path / "c.jsonl", [CHAT] * 12)
    cfg = DataConfig(format="chat", train_files=[str(f)], streaming=True, max_seq_len=128)
    rows = list(train_dataset(tok, cfg))
    assert sum(len(r["seq_lengths"]) for r in rows) == 12 and len(rows) < 12
    assert sorted(rows[0]) == ["input_ids", "labels", "seq_lengths"]


def test_chat_labels_equal_tokenizing_each_prefix(tok):
    """The fast path (one tokenization with offsets, the template rendered through jinja) labels exactly the
    tokens that re-tokenizing the conversation up to each assistant turn would."""
    import random

    from lowbit.recipes.tokenize import chat_batch
    from lowbit.testing import sample_text
    words, rng = sample_text().split(), random.Random(0)
    convs = []
    for _ in range(60):
        msgs = [{"role": "system", "content": " ".join(rng.sample(words, 4))}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": " ".join(rng.sample(words, rng.randint(1, 20)))},
                     {"role": "assistant", "content": " ".join(rng.sample(words, rng.randint(1, 20)))}]
        convs.append(msgs)
    got = chat_batch({"messages": convs}, tok, 512, drop_unlabelled=False)
    for i, msgs in enumerate(convs):
        ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        labels = [IGNORE_INDEX] * len(ids)
        for j, m in enumerate(msgs):
            if m["role"] == "assistant":
                start = len(tok.apply_chat_template(msgs[:j], tokenize=True, add_generation_prompt=True,
                                                    return_dict=False))
                end = len(tok.apply_chat_template(msgs[:j + 1], tokenize=True, return_dict=False))
                labels[start:end] = ids[start:end]
        assert got["input_ids"][i] == list(ids) and got["labels"][i] == labels
