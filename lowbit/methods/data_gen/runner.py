"""`lowbit generate`: load the teacher, generate the missing shards, keep the manifest current."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from lowbit.errors import ConfigError
from lowbit.methods.data_gen.config import GenerateConfig
from lowbit.methods.data_gen.sampler import first_token_ids, generate_batch
from lowbit.methods.data_gen.shards import ShardWriter
from lowbit.models.load import load_4bit_weights
from lowbit.utils.hashing import model_folder_hash
from lowbit.utils.run_record import RunRecord


def load_teacher(cfg: GenerateConfig):
    """(model, tokenizer): the full-precision teacher through lowbit's streaming loader, no quantization."""
    from transformers import AutoTokenizer

    t = cfg.teacher
    run = RunRecord.find(t.path)
    if run is not None:
        raise ConfigError(f"teacher.path {t.path} is a lowbit training run (adapters on the {run.base_model.path} "
                          f"base); the teacher must be a full model: `lowbit merge {t.path} OUT`, then "
                          "teacher.path=OUT")
    model = load_4bit_weights(t.path, load_in_4bit=False, compute_dtype=t.dtype, trust_remote_code=t.trust_remote_code,
                              progress=False)
    tok = AutoTokenizer.from_pretrained(Path(t.tokenizer or t.path), trust_remote_code=t.trust_remote_code)
    return model.to(resolve_device(t.device)).eval(), tok


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"teacher.device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("teacher.device=cuda but no CUDA device is available; use teacher.device=cpu")
    return dev


def identity(cfg: GenerateConfig, model, tok) -> dict:
    """What fixes the data: resuming under a different identity is refused."""
    bos = tok.bos_token_id if cfg.generate.add_bos else None
    return {"teacher": {"hash": model_folder_hash(cfg.teacher.path), "model_type": model.config.model_type,
                        "vocab_size": model.get_output_embeddings().weight.shape[0],
                        "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
            "tokenizer": {"len": len(tok), "bos_id": bos, "eos_id": tok.eos_token_id},
            "settings": {**{k: v for k, v in vars(cfg.generate).items() if k != "num_sequences"},
                         "topk_logits": cfg.output.topk_logits}}


def run(cfg: GenerateConfig) -> dict:
    from tqdm.auto import tqdm
    torch.manual_seed(cfg.generate.seed)  # nothing should draw from the global RNG; this keeps it fixed if it does
    model, tok = load_teacher(cfg)
    vocab = model.get_output_embeddings().weight.shape[0]
    if cfg.output.topk_logits > vocab:
        raise ConfigError(f"output.topk_logits={cfg.output.topk_logits} exceeds the vocabulary ({vocab})")
    ident = identity(cfg, model, tok)
    writer = ShardWriter(cfg.output.dir, ident, cfg.generate.num_sequences, cfg.output.shard_size, cfg.output.repair)
    metadata = {"teacher_path": str(cfg.teacher.path), "device": str(next(model.parameters()).device),
                "config": cfg.to_dict()}
    first_ids = first_token_ids(tok, vocab)
    bos = ident["tokenizer"]["bos_id"]
    pending = writer.pending()
    done = cfg.generate.num_sequences - sum(len(writer.shard_range(s)) for s in pending)
    bar = tqdm(total=cfg.generate.num_sequences, initial=done, unit="seq", desc="generate",
               disable=not cfg.output.progress, dynamic_ncols=True)
    n_tok, n_seq, t0 = 0, 0, time.perf_counter()
    bs = cfg.generate.batch_size
    for s in pending:
        idx = list(writer.shard_range(s))
        seqs = []
        for i in range(0, len(idx), bs):
            batch = generate_batch(model, idx[i:i + bs], cfg.generate, first_ids, bos, tok.eos_token_id,
                                   cfg.output.topk_logits)
            seqs += batch
            n_tok += sum(len(g.ids) for g in batch)
            n_seq += len(batch)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.0f}", shard=s)
        writer.write(s, seqs, metadata)
    if not pending:  # nothing to do, but the manifest still says so (e.g. after output.repair on a clean dir)
        writer.write_manifest()
    bar.close()
    elapsed = time.perf_counter() - t0
    return {"output_dir": str(writer.dir), "generated_sequences": n_seq, "generated_tokens": n_tok,
            "seconds": round(elapsed, 2), "tokens_per_s": round(n_tok / elapsed, 1) if elapsed > 0 else 0.0,
            "skipped_sequences": done, "shards": writer.num_shards}
