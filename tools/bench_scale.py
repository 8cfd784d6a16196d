"""bench-scale: the stages from base to evaluate on synthetic LLaMA checkpoints at real sizes (1B, 3B and the
LLaMA-7B shape), each measured (wall time, peak memory of its process tree, under a cgroup memory limit where the
machine has one) next to the cost plan's prediction, into docs/benchmarks.md.

Run: make bench-scale [SCALE_SHAPES="1b 3b 7b"] [SCALE_LIMIT=16GiB]
     (or: python -m tools.bench_scale --shapes 1b 3b --work /tmp/bench-scale --doc docs/benchmarks.md)

Each shape: random weights in bf16 with the embedded tokenizer (tools/synthetic.py) and a random non-zero LoRA
adapter in PEFT's format (no fine-tune: at these sizes that is a GPU's job, docs/scale-out.md), then base → merge
→ consolidate → convert → imatrix → quantize q4_0 and q4_k_m → reference → evaluate both, each stage run as dvc
runs it (its module's command line) in a work folder, with the bench's params (params.yaml's, with bf16 exports,
shorter gates and calibration, and a smaller evaluation: printed with the results). Outputs a stage no longer
needs are deleted as it goes; a shape whose outputs would not fit the free disk is skipped in one line.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import yaml

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import load_params
from alpaca_lora_cpu.errors import StageError
from tools.bench_doc import DOC_TITLE, machine_stamp, replace_section

GB = 1e9
# The bench's changes to params.yaml: bf16 through the export (as a 7B would be handled), and a pipeline sized so
# a 7B finishes in about an hour on 2 cores; the plan is computed with the very same params.
OVERRIDES = {
    "base": {"dtype": "bfloat16", "max_shard_size": "1GB"},
    "export": {"dtype": "bf16", "max_shard_size": "1GB", "gate_prompts": 4, "gate_max_tokens": 128,
               "max_logit_diff": 1.0},
    "convert": {"gate_prompts": 4, "gate_max_tokens": 128, "min_top1_agreement": 0.5},
    "imatrix": {"max_tokens": 2048, "chunk_size": 512},
    "reference": {"max_records": 8, "max_response_tokens": 64, "generate_records": 2,
                  "showcase_prompts": ["Tell me about alpacas."]},
    "evaluate": {"max_new_tokens": 32, "speed": {"prompt_tokens": 128, "gen_tokens": 32, "runs": 3}},
    "quantize": {"types": ["q4_0", "q4_k_m"]},
}


def _merge(doc: dict, over: dict) -> dict:
    for k, v in over.items():
        doc[k] = _merge(doc.get(k, {}), v) if isinstance(v, dict) and isinstance(doc.get(k), dict) else v
    return doc


def commands(w: Path) -> list[tuple[str, list[str], list[Path]]]:
    """(stage, its command line, outputs to delete after it) in pipeline order, in work folder `w`."""
    p = ["--params", str(w / "params.yaml")]
    val = ["--val", str(w / "data/val.jsonl")]

    def quantize(t: str) -> list[str]:
        return ["stages.quantize", *p, "--type", t, "--src", f"{w}/reference.gguf", "--imatrix", f"{w}/imatrix.gguf",
                "--out", f"{w}/{t}.gguf", "--modelfile", f"{w}/{t}.Modelfile", "--metrics", f"{w}/m/q-{t}.json"]

    def evaluate(t: str) -> list[str]:
        return ["stages.evaluate", *p, "--variant", t, "--gguf", f"{w}/{t}.gguf", "--reference", f"{w}/ref",
                "--metrics", f"{w}/m/e-{t}.json", "--generations", f"{w}/m/e-{t}.jsonl"]

    return [
        ("base", ["stages.base", *p, "--out", f"{w}/base", "--metrics", f"{w}/m/base.json"], [w / "source"]),
        ("merge", ["stages.merge", *p, "--base", f"{w}/base", "--adapter", f"{w}/adapter", *val, "--out",
                   f"{w}/merged", "--metrics", f"{w}/m/merge.json"], [w / "base"]),
        ("consolidate", ["stages.consolidate", *p, "--merged", f"{w}/merged", *val, "--out", f"{w}/consolidated",
                         "--metrics", f"{w}/m/consolidate.json"], [w / "consolidated"]),
        ("convert", ["stages.convert", *p, "--model", f"{w}/merged", *val, "--out", f"{w}/reference.gguf",
                     "--metrics", f"{w}/m/convert.json"], []),
        ("imatrix", ["stages.imatrix", *p, "--merged", f"{w}/merged", "--data", f"{w}/data", "--out",
                     f"{w}/imatrix.gguf", "--hessians", f"{w}/hessians", "--metrics", f"{w}/m/imatrix.json"], []),
        ("quantize@q4_0", quantize("q4_0"), []),
        ("quantize@q4_k_m", quantize("q4_k_m"), []),
        ("reference", ["stages.reference", *p, "--gguf", f"{w}/reference.gguf", "--merged", f"{w}/merged", *val,
                       "--out", f"{w}/ref", "--metrics", f"{w}/m/reference.json"], [w / "merged"]),
        ("evaluate@q4_0", evaluate("q4_0"), []),
        ("evaluate@q4_k_m", evaluate("q4_k_m"), [w / "reference.gguf"]),
    ]


def prepare(w: Path, shape: str, params_file: Path) -> None:
    """The work folder: synthetic model and adapter, the bench's params, a few bundled records as data."""
    from tools.synthetic import SHAPES, tokenizer_dir, write_adapter, write_model

    dims = SHAPES[shape]
    w.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_dir(w.parent / "tokenizer")
    if not (w / "source/config.json").is_file():
        print(f"{shape}: writing the synthetic checkpoint", flush=True)
        write_model(w / "source", dims, tok, "bfloat16", 2 * 10**9)
    write_adapter(w / "adapter", dims)
    doc = _merge(yaml.safe_load(params_file.read_text()), OVERRIDES)
    doc["base"]["model"] = str(w / "source")
    (w / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    records = json.loads(Path("data/sample/alpaca_sample.json").read_text())
    (w / "data").mkdir(exist_ok=True)
    for name, rows in (("train.jsonl", records[:64]), ("val.jsonl", records[64:80])):
        (w / "data" / name).write_text("".join(json.dumps({"input": "", **r}) + "\n" for r in rows))


def disk_needed(shape: str) -> float:
    """Bytes the shape's outputs take at the busiest point (source and base, or merged, consolidated and the f16
    reference), with a margin."""
    from alpaca_lora_cpu.cost import Shape
    from tools.synthetic import SHAPES

    d = SHAPES[shape]
    s = Shape(49152, d.hidden, d.layers, d.ffn, d.heads, d.kv_heads, d.tied, "bfloat16")
    return 3.3 * s.size("bf16")


def bench_shape(shape: str, work: Path, params_file: Path, rates: dict, limit: int | None) -> list[dict]:
    from alpaca_lora_cpu.cost import Shape, stage_costs
    from alpaca_lora_cpu.cost import work as work_of
    from tools.measure import measure

    w = work / shape
    prepare(w, shape, params_file)
    params = load_params(w / "params.yaml")
    plan = {c.stage.replace("convert@finetuned", "convert"): c
            for c in stage_costs(params, Shape.read(w / "source"), work_of(params, w / "data", (64, 16)), rates)}
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{w}/mlflow.db",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd() / "src"), str(Path.cwd()),
                                                       os.environ.get("PYTHONPATH")]))}
    rows = []
    for stage, cmd, done_with in commands(w):
        m = measure([sys.executable, "-m", *cmd], env=env, limit=limit)
        if m.returncode != 0:
            line = next((ln for ln in reversed(m.stderr.splitlines()) if ln.startswith("error")), m.stderr[-300:])
            why = "killed: over the memory limit" if m.oom else line
            raise StageError(f"bench-scale {shape} {stage} failed ({why})")
        c = plan[stage]
        rows.append({"shape": shape, "stage": stage, "seconds": m.seconds, "peak_anon": m.peak_anon,
                     "peak_rss": m.peak_rss, "cgroup_peak": m.cgroup_peak, "limit": m.limit,
                     "predicted_seconds": c.seconds, "predicted_peak": c.peak, "predicted_mapped": c.mapped})
        print(f"{shape} {stage:16} {m.seconds:7.0f} s (plan {c.seconds:6.0f})  anon {m.peak_anon / GB:5.2f} GB "
              f"(plan {c.peak / GB:5.2f})  rss {m.peak_rss / GB:5.2f} GB", flush=True)
        for path in done_with:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return rows


def doc_section(rows: list[dict], skipped: list[str], limit: int | None, shapes: list[str], argv: list[str],
                doc: Path, stamp: str | None = None) -> str:
    from tools.synthetic import SHAPES

    lim = f"a cgroup memory limit of {limit / 2**30:.0f} GiB (every stage finished under it)" if limit else \
        "no memory limit (this machine has no writable cgroup)"
    lines = [f"## bench-scale: {stamp or machine_stamp(doc)}", "",
             f"`python -m tools.bench_scale {' '.join(argv)}`", "",
             f"Synthetic LLaMA checkpoints (random bf16 weights, SmolLM2's 49,152-token tokenizer, a rank-8 LoRA on "
             f"every linear), each stage run under {lim}. Peak = the largest anonymous memory of the stage's process "
             "tree (what it allocates); RSS also counts the pages of the model files it maps (llama.cpp's GGUF, "
             "reclaimable page cache). Predicted = `make plan`'s cost model with this machine's measured rates and "
             f"the bench's params (tools/bench_scale.py OVERRIDES: {json.dumps(OVERRIDES)}).", ""]
    for shape in shapes:
        if shape in skipped:
            continue
        d = SHAPES[shape]
        mine = [r for r in rows if r["shape"] == shape]
        lines += [f"**{shape}** (hidden {d.hidden}, {d.layers} layers, FFN {d.ffn}, {d.heads}/{d.kv_heads} heads, "
                  f"{'tied' if d.tied else 'untied'} embeddings)", "",
                  "| stage | time | predicted | peak GB | predicted GB | RSS GB (with mapped files) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['stage']} | {r['seconds']:.0f} s | {r['predicted_seconds']:.0f} s | "
                  f"{r['peak_anon'] / GB:.2f} | {r['predicted_peak'] / GB:.2f} | {r['peak_rss'] / GB:.2f} |"
                  for r in mine]
        lines += ["", f"Total {sum(r['seconds'] for r in mine) / 60:.1f} min measured, "
                      f"{sum(r['predicted_seconds'] for r in mine) / 60:.1f} min predicted; largest peak "
                      f"{max(r['peak_anon'] for r in mine) / GB:.2f} GB.", ""]
    if skipped:
        lines += [f"Skipped (not enough free disk): {', '.join(skipped)}."]
    return "\n".join(lines).rstrip()


def predictions(shape: str, params_file: Path, rates: dict) -> dict:
    """The plan's costs (stage → Cost) for a shape with the bench's params, without making the checkpoint."""
    import tempfile

    from alpaca_lora_cpu.cost import Shape, stage_costs
    from alpaca_lora_cpu.cost import work as work_of
    from tools.synthetic import SHAPES

    d = SHAPES[shape]
    with tempfile.TemporaryDirectory() as tmp:
        doc = _merge(yaml.safe_load(params_file.read_text()), OVERRIDES)
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(doc))
        params = load_params(Path(tmp) / "params.yaml")
    shape_ = Shape(49152, d.hidden, d.layers, d.ffn, d.heads, d.kv_heads, d.tied, "bfloat16")
    return {c.stage.replace("convert@finetuned", "convert"): c
            for c in stage_costs(params, shape_, work_of(params, None, (64, 16)), rates)}


def replan(args) -> None:
    """Recompute the predicted columns of measured results (--json) and rewrite the doc's section, saying so."""
    from alpaca_lora_cpu.machine import rates as measured
    from alpaca_lora_cpu.tracking import git_commit

    if not (args.json and args.json.is_file() and args.doc):
        raise StageError("--replan needs --json (the measured results) and --doc")
    saved = json.loads(args.json.read_text())
    rows, stamp, limit = saved["rows"], saved["stamp"], saved.get("limit")
    rates = measured(load_params(args.params).evaluate.threads)
    plans = {shape: predictions(shape, Path(args.params), rates) for shape in {r["shape"] for r in rows}}
    for r in rows:
        c = plans[r["shape"]][r["stage"]]
        r.update(predicted_seconds=c.seconds, predicted_peak=c.peak, predicted_mapped=c.mapped)
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    text = doc_section(rows, saved.get("skipped", []), limit, shapes, saved["argv"], args.doc, stamp)
    commit = git_commit()
    short = commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")
    note = (f"\n\nPredicted columns recomputed by commit {short}'s cost model (`--replan`); the measurements are "
            "the stamp's.")
    replace_section(args.doc, "bench-scale", text + note, title=DOC_TITLE)
    args.json.write_text(json.dumps({**saved, "rows": rows}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__)
    ap.add_argument("--shapes", nargs="+", default=["1b", "3b", "7b"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-scale"))
    ap.add_argument("--limit", default="16GiB", help="cgroup memory limit per stage (none: unlimited)")
    ap.add_argument("--doc", type=Path, help="write the results as a stamped section of this Markdown file")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--replan", action="store_true", help="no measuring: the plan's predictions for the results in "
                    "--json, recomputed with this commit's cost model, into --doc (the measurements keep their stamp)")
    args = parse_args(ap, argv)
    load_params(args.params)
    from alpaca_lora_cpu.machine import rates as measured
    from alpaca_lora_cpu.shards import parse_size
    from tools.measure import cgroup_available
    from tools.synthetic import SHAPES

    if args.replan:
        return replan(args)
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        raise StageError(f"--shapes: unknown shape {unknown[0]!r} (known: {', '.join(SHAPES)})")
    limit = None if args.limit == "none" or not cgroup_available() else parse_size(args.limit)
    rates = measured(load_params(args.params).evaluate.threads)
    rows, skipped = [], []
    args.work.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes:
        free = shutil.disk_usage(args.work).free
        if free < disk_needed(shape):
            print(f"{shape}: skipped: needs about {disk_needed(shape) / GB:.0f} GB of free disk in {args.work}, "
                  f"{free / GB:.0f} GB free")
            skipped.append(shape)
            continue
        rows += bench_shape(shape, args.work, Path(args.params), rates, limit)
        shutil.rmtree(args.work / shape, ignore_errors=True)
    given = list(argv if argv is not None else sys.argv[1:])
    stamp = machine_stamp(args.doc)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "skipped": skipped, "limit": limit, "argv": given,
                                         "stamp": stamp}, indent=1) + "\n")
    if args.doc:
        replace_section(args.doc, "bench-scale", doc_section(rows, skipped, limit, args.shapes, given, args.doc,
                                                             stamp), title=DOC_TITLE)


if __name__ == "__main__":
    run_cli(main)
