"""Generated shards as a torch Dataset of {input_ids, labels} (plus top-k teacher logits for
offline distillation), each sequence preceded by the BOS the teacher was conditioned on."""
from __future__ import annotations

from pathlib import Path

import torch

from lowbit.errors import ConfigError, InputError
from lowbit.methods.data_gen.shards import iter_shards, read_manifest, read_topk


class GeneratedDataset(torch.utils.data.Dataset):
    """One example per generated sequence: input_ids = [BOS] + ids (BOS only if the teacher saw
    one; it is then the tokenizer's BOS), truncated to max_seq_len; labels = input_ids.

    with_topk=True adds `topk_values` (fp16) and `topk_indices` (int32), [len(input_ids) - 1, k]:
    row j is the teacher's top-k logits for the token at position j + 1.
    Passing the student's tokenizer (or vocab_size) checks it matches the teacher's vocabulary.
    """

    def __init__(self, out_dir, tokenizer=None, max_seq_len: int | None = None, with_topk: bool = False,
                 vocab_size: int | None = None, verify: bool = True):
        self.dir = Path(out_dir)
        m = read_manifest(self.dir)
        tmeta = m["identity"]["tokenizer"]
        teacher_vocab = m["identity"]["teacher"]["vocab_size"]
        if tokenizer is not None:
            if len(tokenizer) != tmeta["len"]:
                raise ConfigError(f"vocabulary mismatch: the data in {out_dir} was generated with a "
                                  f"{tmeta['len']}-token tokenizer, the student's has {len(tokenizer)}; use a student "
                                  "of the teacher's family (same tokenizer)")
            if tmeta["bos_id"] is not None and tokenizer.bos_token_id != tmeta["bos_id"]:
                raise ConfigError(f"the data was generated after BOS id {tmeta['bos_id']}, the student's tokenizer "
                                  f"has BOS id {tokenizer.bos_token_id}; use the teacher's tokenizer")
        if vocab_size is not None and vocab_size != teacher_vocab:
            raise ConfigError(f"vocabulary mismatch: teacher vocab_size {teacher_vocab} (data in {out_dir}), student "
                              f"{vocab_size}; distillation needs the same vocabulary")
        if max_seq_len is not None and max_seq_len < 2:
            raise ConfigError(f"max_seq_len must be >= 2, got {max_seq_len}")
        self.prefix = [tmeta["bos_id"]] if tmeta["bos_id"] is not None else []
        self.max_seq_len, self.with_topk = max_seq_len, with_topk
        self.examples: list[list[int]] = []
        self.topk: list[tuple[torch.Tensor, torch.Tensor]] = []
        for entry, rows in iter_shards(self.dir, verify):
            if with_topk:
                values, indices, offsets = read_topk(self.dir, entry)
                if offsets.numel() != len(rows) + 1:
                    raise InputError(f"{entry['topk_file']} has {offsets.numel() - 1} sequences, "
                                     f"{entry['file']} has {len(rows)}; rerun with output.repair=true")
            for r, row in enumerate(rows):
                self.examples.append(row["ids"])
                if with_topk:
                    a, b = int(offsets[r]), int(offsets[r + 1])
                    self.topk.append((values[a:b], indices[a:b]))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ids = (self.prefix + self.examples[i])[:self.max_seq_len]
        item = {"input_ids": ids, "labels": list(ids)}
        if self.with_topk:
            v, idx = self.topk[i]
            item["topk_values"], item["topk_indices"] = v[:len(ids) - 1], idx[:len(ids) - 1]
        return item
