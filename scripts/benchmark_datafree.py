"""Data-free NF4 repair on Gemma-3-270M: how much of the NF4 round-to-nearest gap the teacher's own text recovers.

One invocation, side by side: same teacher (the bf16 model), same generated tokens (`--data`, `lowbit generate`
output), same steps × batch × length, same seed, two held-out texts the students never see (Hamlet; Milton's
Areopagitica, `data/milton`). Students, all LoRA r=16 on the NF4 base:
  * kd            zero-init LoRA, KL to the teacher (the earlier "data-free NF4 repair" row);
  * loftq         calibrated LoftQ whose activation moments come from the *generated* text (data-free), init only;
  * loftq+kd      that init, then the same KD;
  * loftq+kd+hid  that init, KD plus per-layer hidden-state matching (distill.hidden_weight);
and for reference loftq-real: LoftQ calibrated on real text (the five plays, not Hamlet), init only.
The best recipe is also scored during training (--curve-steps), exported with `lowbit export --format peft`,
reloaded and scored again; --calib-curve N... scores the data-free LoftQ init calibrated on N generated sequences
each (the recovery-vs-generated-tokens plot). Gap recovered = (ppl_RTN − ppl) / (ppl_RTN − ppl_teacher).

    .venv/bin/python scripts/benchmark_datafree.py [--data outputs/datafree/gen256] [--steps 64] [--seed 0]
    .venv/bin/python scripts/benchmark_datafree.py --study --model .cache/models/smollm2-135m-instruct --steps 16

--study ranks options cheaply (small generated sets per generation setting; temperature, top-k, hidden-state weight
and loss) on the given model. Numbers go to <out>/results.json as measured; a rerun with the same settings resumes.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchmark_qat import Results, _ppl  # noqa: E402  (one harness for the QAT benchmarks)

CONFIG = "configs/llm_qat/distill-gemma3-270m-nf4.yaml"
GEN_CONFIG = "configs/llm_qat/generate-gemma3-270m.yaml"
EVAL_TEXTS = {"hamlet": "data/shakespeare/heldout_hamlet.txt", "milton": "data/milton/heldout_areopagitica.txt"}
REAL_TEXT = "data/shakespeare/train.txt"
ZERO = ("lora.init=zero", "distill.hidden_weight=0.0")  # the config's recipe is loftq+kd+hid: switch each lever off
LOFTQ = ("lora.init=loftq", "distill.hidden_weight=0.0")
STUDENTS = {  # name -> (extra config overrides, train?)
    "kd": (ZERO, True),
    "loftq+kd": (LOFTQ, True),
    "loftq+kd+hid": (("lora.init=loftq", "distill.hidden_weight=1.0", "distill.hidden_loss=mse"), True),
    # KD that starts at the closed-form init: lower lr and T=2 (the SmolLM2 study's better temperature)
    "loftq+kd gentle": (LOFTQ + ("train.lr=0.0001", "distill.temperature=2.0"), True),
    "loftq-real": (("lora.init=loftq", f"lora.loftq.calibration={REAL_TEXT}"), False),
    # init-only levers of the data-free LoftQ itself
    "loftq r=32": (LOFTQ + ("lora.r=32", "lora.alpha=64"), False),
    "loftq r=64": (LOFTQ + ("lora.r=64", "lora.alpha=128"), False),
    "loftq r=128": (LOFTQ + ("lora.r=128", "lora.alpha=256"), False),
    "loftq r=64+kd gentle": (LOFTQ + ("lora.r=64", "lora.alpha=128", "train.lr=0.0001", "distill.temperature=2.0"), True),
    "loftq damp 0.1": (LOFTQ + ("lora.loftq.damp=0.1",), False),
    "loftq full SVD": (LOFTQ + ("lora.loftq.svd=full",), False),
}
BEST = "loftq+kd+hid"


def _cfg(a, out: str, *extra):
    from lowbit.recipes.config import load_config
    return load_config(CONFIG, [
        f"model.path={a.model}", f"train.output_dir={a.out}/{out}", f"train.max_steps={a.steps}", f"train.seed={a.seed}",
        f"train.batch_size={a.batch}", f"train.lr={a.lr}", f"train.warmup_steps={a.warmup}", f"data.max_seq_len={a.seq}",
        f"data.train_files=[{a.data}]",
        f"data.max_eval_blocks={a.eval_blocks}", f"lora.loftq.calibration={a.data}",
        f"lora.loftq.calibration_samples={a.calib_samples}", f"lora.loftq.calibration_seq_len={a.seq}",
        "eval.before=false", "eval.after=false", "train.report_to=[jsonl]", "train.overwrite_output=true",
        "train.save_steps=0", "train.gradient_checkpointing=false",
        # the students' common base, pinned (the config itself carries the recommended recipe, r=64)
        "lora.r=16", "lora.alpha=32", "distill.temperature=1.0", "distill.hidden_weight=1.0", *extra])


def _eval_sets(a) -> dict:
    from transformers import AutoTokenizer

    from lowbit.recipes.data import build_datasets
    from lowbit.utils.batching import Collator
    tok = AutoTokenizer.from_pretrained(a.model)
    sets = {}
    for name, path in EVAL_TEXTS.items():
        _, ev = build_datasets(tok, _cfg(a, "eval", "data.format=text", f"data.train_files=[{path}]",
                                         f"data.eval_files=[{path}]").data, a.seed)
        sets[name] = (ev, Collator(tok.pad_token_id))
    return sets


def _scores(model, a, tag: str) -> dict:
    return {k: _ppl(model, ev, f"{tag} {k}") for k, ev in a.evals.items()}


class _Curve:
    """Scores the student at chosen steps while it trains (the recovery-vs-tokens curve)."""

    def __init__(self, a, steps):
        from transformers import TrainerCallback
        self.points, self.steps, self.seconds, self.cpu_seconds = {}, set(steps), 0.0, 0.0
        cb = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step in cb.steps and state.global_step != a.steps:
                    t0, c0 = time.perf_counter(), _cpu_s()
                    cb.points[state.global_step] = _scores(model, a, f"step {state.global_step}")
                    cb.seconds += time.perf_counter() - t0
                    cb.cpu_seconds += _cpu_s() - c0
        self.callback = Callback()


_LOFTQ_DONE: dict = {}


def _reuse_loftq():
    """Both LoftQ students start from the same LoftQ bytes: compute them once per process, copy for the second."""
    from lowbit.methods.loftq import LOFTQ_BASE_FILE, LOFTQ_REPORT_FILE, load_loftq_base
    from lowbit.recipes import phases
    orig = phases.loftq_for_run

    def memo(model, tok, cfg, out, resuming=False, progress=True):
        key = json.dumps([cfg.model.path, cfg.lora.r, cfg.lora.alpha, vars(cfg.lora.loftq)], sort_keys=True, default=str)
        if key in _LOFTQ_DONE and not resuming:
            first_out, got = _LOFTQ_DONE[key]
            for f in (LOFTQ_BASE_FILE, LOFTQ_REPORT_FILE):
                shutil.copy2(Path(first_out) / f, Path(out) / f)
            load_loftq_base(model, Path(out) / LOFTQ_BASE_FILE)
            return got
        got = orig(model, tok, cfg, out, resuming, progress)
        _LOFTQ_DONE[key] = (out, got)
        return got
    phases.loftq_for_run = memo


def _student(a, name: str, extra=None, train=None, curve_steps=()) -> dict:
    """One student through the recipe's phases: init scores, training (timed), final scores, adapters saved."""
    from lowbit.recipes import phases
    if extra is None:
        extra, train = STUDENTS[name]
    r = phases.start(_cfg(a, name, *extra))
    phases.data_phase(r)
    t0 = time.perf_counter()
    phases.model_phase(r)
    out = {"model_s": round(time.perf_counter() - t0, 1)}
    if r.loftq is not None:
        out["loftq"] = {k: r.loftq.record.get(k) for k in ("seconds", "mean_zero_init_error", "mean_loftq_error")}
        out["init"] = _scores(r.model, a, f"{name} init")
    if not train:
        return out
    phases.trainer_phase(r)
    curve = _Curve(a, curve_steps)
    r.trainer.add_callback(curve.callback)
    cpu0, t0 = _cpu_s(), time.perf_counter()
    phases.train_phase(r)
    # the curve's scoring ran inside the loop: it is not training time
    out["train_s"] = round(time.perf_counter() - t0 - curve.seconds, 1)
    out["train_cpu_s"] = round(_cpu_s() - cpu0 - curve.cpu_seconds, 1)
    out["train_loss"], out["steps"] = r.metrics["train_loss"], r.metrics["train_steps"]
    out["after"] = _scores(r.model, a, f"{name} after")
    out["curve"] = curve.points
    phases.save_phase(r)
    return out


def _cpu_s() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _export_check(a, name: str) -> dict:
    """`lowbit export RUN OUT --format peft`, reload the exported adapter on its base, score it again."""
    from lowbit.export.merge import load_adapter_model, resolve_adapter
    run_dir, out = Path(a.out) / name, Path(a.out) / f"{name}-peft"
    cmd = [sys.executable, "-m", "lowbit", "export", str(run_dir), str(out), "--format", "peft", "--overwrite"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"export failed:\n{p.stderr[-2000:]}")
    model, _ = load_adapter_model(resolve_adapter(out, a.model), compute_dtype="auto")
    return {"student": name, "exported": str(out), "reloaded": _scores(model, a, f"{name} exported+reloaded")}


def _generate(a, out_dir: str, *overrides) -> dict:
    from lowbit.methods.data_gen.config import load_generate_config
    from lowbit.methods.data_gen.runner import run as generate
    return generate(load_generate_config(GEN_CONFIG, [f"teacher.path={a.model}", "generate.stop_at_eos=false",
                                                      f"output.dir={out_dir}", "output.topk_logits=0",
                                                      "output.shard_size=64", "output.progress=false", *overrides]))


# --study: one lever at a time against "base" (zero-init KD at T=1 on the base generation setting)
GEN_SETTINGS = {  # name -> lowbit generate overrides (the same number of generated tokens each)
    "base": (),  # first token uniform, 3-5 greedy, then sampling at T=1 (LLM-QAT)
    "T=0.8": ("generate.temperature=0.8",),
    "first every_id": ("generate.first_token=every_id",),
}
KD_OPTIONS = {  # name -> (training overrides, train?) on the base generated set, run in this order
    "kd+hid mse w=1": (("distill.hidden_weight=1.0",), True),
    "loftq": (LOFTQ, False),
    "loftq+kd+hid w=1": (("lora.init=loftq", "distill.hidden_weight=1.0"), True),
    "kd+hid cos w=1": (("distill.hidden_weight=1.0", "distill.hidden_loss=cosine"), True),
    "kd+hid mse w=0.1": (("distill.hidden_weight=0.1",), True),
    "kd T=2": (("distill.temperature=2.0",), True),
    "loftq+kd": (LOFTQ, True),
    "kd top-k 32": (("distill.top_k=32",), True),
}


def study(a) -> int:
    from _bench import machine_info, markdown_table, write_results
    from benchmark_qat import _model
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = Results(out / "results.json", {k: getattr(a, k) for k in ("model", "seq", "steps", "batch", "lr", "warmup", "seed",
                                                                     "eval_blocks", "calib_samples", "sequences")})
    a.evals = _eval_sets(a)
    res.get_or("teacher", lambda: _scores(_model(a), a, "teacher"))
    res.get_or("RTN nf4", lambda: _scores(_model(a, four_bit=True), a, "RTN NF4"))
    gen_root = Path("outputs/datafree") / f"study-{Path(a.model).name}-{a.sequences}x{a.seq}"

    def gen(g):  # generated right before its first student: a stopped study keeps what it measured
        data = str(gen_root / re.sub(r"[^A-Za-z0-9.]+", "_", g))
        res.get_or(f"gen {g}", lambda: _generate(a, data, f"generate.num_sequences={a.sequences}",
                                                 f"generate.max_len={a.seq}", *GEN_SETTINGS[g]))
        return data
    runs = {"kd [base]": ("base", ZERO, True)}
    runs.update({k: ("base", ZERO + over, train) for k, (over, train) in KD_OPTIONS.items()})
    runs.update({f"kd [{g}]": (g, ZERO, True) for g in GEN_SETTINGS if g != "base"})
    _reuse_loftq()
    for k, (g, over, train) in runs.items():
        if k not in res:
            a.data = gen(g)
        res.get_or(k, lambda: _student(a, re.sub(r"[^A-Za-z0-9.+-]+", "_", k).strip("_"), over, train))
    res["machine"] = machine_info()
    rows = []
    for k in runs:
        got = res.get(k)
        if got is None:
            continue
        ppl = got["after"] if "after" in got else got["init"]
        rows.append({"run": k, **{f"{t} recovered": _recovery(res["RTN nf4"][t], res["teacher"][t], ppl[t])
                                  for t in EVAL_TEXTS}, "train s": got.get("train_s", "")})
    write_results(rows, out / "study", dict(res))
    print(markdown_table(rows, list(rows[0])))
    return 0


def _recovery(rtn: float, teacher: float, ppl: float) -> float:
    return (rtn - ppl) / (rtn - teacher)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=".cache/models/gemma-3-270m")
    ap.add_argument("--data", default="outputs/datafree/gen128", help="lowbit generate output (made if missing)")
    ap.add_argument("--sequences", type=int, default=128, help="sequences to generate when --data is missing")
    ap.add_argument("--seq", type=int, default=128, help="generated = training = eval block length")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=1, help="warm-up steps of the cosine schedule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-blocks", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=32, help="generated sequences calibrating LoftQ")
    ap.add_argument("--curve-steps", type=int, nargs="*", default=[4], help="extra scores of the best student")
    ap.add_argument("--calib-curve", type=int, nargs="*", default=[],
                    help="also score the LoftQ (gen) init calibrated on each of these numbers of generated sequences")
    ap.add_argument("--curve-of", default="loftq+kd", choices=[k for k in STUDENTS if k.startswith("loftq")],
                    help="the student whose LoftQ init --calib-curve scores (its init settings, no training)")
    ap.add_argument("--best", default=BEST, choices=list(STUDENTS),
                    help="the recipe scored during training (--curve-steps), exported and reloaded")
    ap.add_argument("--gen-probe", type=int, default=16, help="sequences generated to time the generator (0: skip)")
    ap.add_argument("--out", default="outputs/bench/datafree")
    ap.add_argument("--runs", nargs="*", default=None, help="students to train now (default: all)")
    ap.add_argument("--part", default=None, help="run --runs only, into results-PART.json (a second process beside the "
                    "main one); the main invocation's report merges every part with the same settings")
    ap.add_argument("--study", action="store_true", help="rank options on --model instead (see the docstring)")
    a = ap.parse_args()
    import torch
    torch.manual_seed(a.seed)
    from _bench import machine_info
    if a.study:
        return study(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(a, k) for k in ("model", "data", "seq", "steps", "batch", "lr", "warmup", "seed",
                                           "eval_blocks", "calib_samples")}
    res = Results(out / (f"results-{a.part}.json" if a.part else "results.json"), settings)
    if not (Path(a.data) / "manifest.json").exists() or not json.loads((Path(a.data) / "manifest.json").read_text()).get(
            "complete"):
        res.get_or("generate", lambda: _generate(a, a.data, f"generate.num_sequences={a.sequences}",
                                                 f"generate.max_len={a.seq}"))
    if a.gen_probe and not a.part:  # the generator's speed on this machine now, same settings, a scratch folder
        def probe():
            c0 = _cpu_s()
            got = _generate(a, str(out / "gen_probe"), f"generate.num_sequences={a.gen_probe}",
                            f"generate.max_len={a.seq}", f"generate.seed={a.seed + 1}")
            return {**got, "cpu_s": round(_cpu_s() - c0, 1)}
        res.get_or("generate_probe", probe)
    a.evals = _eval_sets(a)
    from benchmark_qat import _model
    if not a.part:  # the references depend only on the eval settings: kept across changes of the training ones
        refs = Results(out / "references.json", {k: getattr(a, k) for k in ("model", "seq", "seed", "eval_blocks")})
        res["teacher"] = refs.get_or("teacher", lambda: _scores(_model(a), a, "teacher"))
        res["RTN nf4"] = refs.get_or("RTN nf4", lambda: _scores(_model(a, four_bit=True), a, "RTN NF4"))
    _reuse_loftq()
    res["machine"] = machine_info()
    for name in a.runs if a.runs is not None else list(STUDENTS):
        if not a.part and name not in res and name in _merged(res, out, settings):
            continue  # measured by a --part process with these settings
        res.get_or(name, lambda: _student(a, name, curve_steps=a.curve_steps if name == a.best else ()))
        if name == a.best:
            res.get_or("export", lambda: _export_check(a, a.best))
        if not a.part:
            write_report(_merged(res, out, settings), out, a)  # after each student: a stopped run leaves its table
    for n in a.calib_curve if not a.part else ():
        over = STUDENTS[a.curve_of][0] + (f"lora.loftq.calibration_samples={n}",)
        tag = _curve_tag(a.curve_of)
        res.get_or(f"calib {n}{tag}", lambda n=n, over=over, tag=tag: _student(
            a, f"loftq-gen{n}{tag.replace(' ', '_')}", over, False))
        write_report(_merged(res, out, settings), out, a)
    if not a.part:
        write_report(_merged(res, out, settings), out, a)
    return 0


def _curve_tag(name: str) -> str:
    """Result-key suffix of a --calib-curve point: none for the r=16 LoftQ init, else the recipe's rank."""
    r = [o.split("=")[1] for o in STUDENTS[name][0] if o.startswith("lora.r=")]
    return f" r{r[0]}" if r else ""


def _curves(res: dict) -> dict:
    """{tag: [(calibration sequences, result)]} of the --calib-curve points, sorted."""
    out: dict = {}
    for k, v in res.items():
        if k.startswith("calib "):
            parts = k.split()
            out.setdefault(" ".join(parts[2:]) or "r16", []).append((int(parts[1]), v))
    return {t: sorted(p, key=lambda x: x[0]) for t, p in out.items()}


def _merged(res: dict, out: Path, settings: dict) -> dict:
    """The main results plus every results-PART.json measured with the same settings."""
    merged = dict(res)
    for p in sorted(out.glob("results-*.json")):
        part = json.loads(p.read_text())
        if part.get("settings") == settings:
            merged.update({k: v for k, v in part.items() if k not in merged})
    return merged


def write_report(res: dict, out: Path, a) -> None:
    from _bench import markdown_table, write_results
    rows = []
    for text in EVAL_TEXTS:
        t, rtn = res["teacher"][text], res["RTN nf4"][text]
        rows.append({"text": text, "student": "teacher (bf16)", "ppl": t, "gap recovered": 1.0})
        rows.append({"text": text, "student": "RTN NF4", "ppl": rtn, "gap recovered": 0.0})
        for name in STUDENTS:
            got = res.get(name)
            if not got:
                continue
            if "init" in got:
                rows.append({"text": text, "student": f"{name} init", "ppl": got["init"][text],
                             "gap recovered": _recovery(rtn, t, got["init"][text])})
            if "after" in got:
                rows.append({"text": text, "student": name, "ppl": got["after"][text],
                             "gap recovered": _recovery(rtn, t, got["after"][text])})
        for tag, points in _curves(res).items():
            for n, got in points:
                rows.append({"text": text, "student": f"loftq {tag} (gen) init, {n} sequences = {n * a.seq} tokens",
                             "ppl": got["init"][text], "gap recovered": _recovery(rtn, t, got["init"][text])})
        if "export" in res:
            ppl = res["export"]["reloaded"][text]
            rows.append({"text": text, "student": f"{res['export'].get('student', BEST)} exported (peft) + reloaded",
                         "ppl": ppl,
                         "gap recovered": _recovery(rtn, t, ppl)})
    write_results(rows, out / "datafree", dict(res))
    print(markdown_table(rows, list(rows[0])))
    if a.best in res or any(k.startswith("calib ") for k in res):
        _plot(res, out / "datafree.png", a)


def _plot(res: dict, path: Path, a) -> None:
    """Recovery vs generated tokens, both held-out texts: (left) the data-free LoftQ init against the number of
    generated tokens it is calibrated on; (right) the best KD recipe scored during its run (0 tokens = its init)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = _curves(res)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for text in EVAL_TEXTS:
        t, rtn = res["teacher"][text], res["RTN nf4"][text]
        for tag, calib in curves.items():
            axes[0].plot([n * a.seq for n, _ in calib], [100 * _recovery(rtn, t, v["init"][text]) for _, v in calib],
                         "o-", label=f"LoftQ {tag} (gen) init, {text}")
        if a.best in res:
            best, per_step = res[a.best], a.batch * a.seq
            pts = {0: best["init"][text], **{int(s): v[text] for s, v in best["curve"].items()}, best["steps"]:
                   best["after"][text]}
            xs = sorted(pts)
            axes[1].plot([x * per_step for x in xs], [100 * _recovery(rtn, t, pts[x]) for x in xs], "o-",
                         label=f"{a.best}, {text}")
        if "kd" in res:
            axes[1].plot([res["kd"]["steps"] * a.batch * a.seq], [100 * _recovery(rtn, t, res["kd"]["after"][text])],
                         "x", ms=9, label=f"kd (zero init), {text}")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("generated tokens LoftQ is calibrated on (no training)")
    axes[1].set_xlabel(f"generated tokens trained on (init: {a.calib_samples * a.seq} calibration tokens)")
    for ax in axes:
        ax.axhline(70, color="k", ls="--", lw=1, label="target 70 %")
        ax.set_ylabel("NF4 RTN perplexity gap recovered (%)")
        ax.legend(fontsize=7)
    fig.suptitle(f"Data-free NF4 repair, {Path(a.model).name}, seed {a.seed}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
