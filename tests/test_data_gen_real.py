"""`lowbit generate` on the real Gemma-3-270M (bf16, sliding-window KV cache, 262k vocabulary). Slow; CI runs it."""
import json
from pathlib import Path

import pytest
import torch

from lowbit.methods.data_gen.config import load_generate_config
from lowbit.methods.data_gen.dataset import GeneratedDataset
from lowbit.methods.data_gen.runner import run
from lowbit.methods.data_gen.shards import read_manifest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / ".cache/models/gemma-3-270m"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not MODEL.exists(), reason="run scripts/prepare_model.py first")]


def test_generate_gemma_with_topk(tmp_path):
    cfg = load_generate_config(ROOT / "configs/llm_qat/generate-gemma3-270m.yaml",
                               [f"teacher.path={MODEL}", f"output.dir={tmp_path}", "teacher.device=cpu",
                                "generate.num_sequences=4", "generate.batch_size=4", "output.shard_size=4",
                                "generate.max_len=12", "generate.greedy_min=12", "generate.greedy_max=12",
                                "output.topk_logits=8", "output.progress=false"])
    summary = run(cfg)
    assert summary["generated_sequences"] == 4
    m = read_manifest(tmp_path)
    assert m["identity"]["teacher"]["vocab_size"] == 262144 and m["identity"]["tokenizer"]["bos_id"] == 2
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(MODEL)
    ds = GeneratedDataset(tmp_path, tokenizer=tok, with_topk=True)
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    for item in ds:
        ids = item["input_ids"]
        assert ids[0] == 2 and ids[1] not in special
        # all greedy: each token is the teacher's top-1 at the previous position (bf16 cached decode)
        for j in range(1, len(ids) - 1):
            row_ids, row_vals = item["topk_indices"][j].tolist(), item["topk_values"][j]
            assert ids[j + 1] in row_ids and row_vals[row_ids.index(ids[j + 1])] == row_vals[0]  # ties allowed
        assert torch.all(item["topk_values"][:, :-1] >= item["topk_values"][:, 1:])   # stored sorted
        assert json.dumps(tok.decode(ids[1:]))  # decodes
