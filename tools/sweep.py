"""sweep: the recipe study. Queues one DVC experiment per recipe and seed of configs/sweep.yaml, runs the queue,
scores every fine-tune on a held-out part of the source that no run trains or validates on, and writes the table
(docs/recipes.md, with a plot).

Run: make sweep SWEEP_SOURCE=../shared/data/alpaca_cleaned_head.json
     (or: python -m tools.sweep --grid configs/sweep.yaml --source FILE --doc docs/recipes.md [--collect]
      [--heldout-source FILE])

Each (recipe, seed) is `dvc exp run --queue -n sweep-<recipe>-s<seed> -S data.source=<FILE> -S finetune.seed=<seed>
-S key=value … finetune`: the `base`, `prepare` and `finetune` stages of that experiment, in its own temporary
workspace, one at a time (`dvc exp run --run-all`). The results are ordinary DVC experiments (`dvc exp show`,
`dvc exp apply sweep-<recipe>-s<seed>`) and MLflow runs (tag dvc_exp_name). The data seed stays fixed, so every
run samples the same train/val records and only the training seed varies.

Then, in this process: the held-out part is `heldout.records` records of `--heldout-source` (default: the source)
outside every run's train + val sample, drawn with `heldout.seed`. Each experiment's adapter is read from the DVC
cache (dvc.api.DVCFileSystem at its commit) and scored there with the base model (alpaca_lora_cpu/heldout.py):
response PPL per record and instruction-following strict accuracy on the first `heldout.ifeval_prompts` bundled
IF prompts; the base is scored the same way once. Scores are cached in models/sweep/ (not committed: derived from
the data). Per recipe the table gives mean ± sd over seeds, and paired-bootstrap intervals (over the held-out
records, or the IF prompts, with each recipe's seeds averaged) of its difference to the base and to the grid's
`default`. `--collect` only rescores what is missing and rewrites the table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import DataParams, build, load_params, read_params
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import atomic_path, read_json, write_json
from tools.bench_doc import machine_stamp, replace_section

PREFIX = "sweep-"
METRICS = "reports/metrics/finetune.json"
DETAILS = "reports/metrics/finetune.details.json"
SCORES = Path("models/sweep")
TITLE = ("# Recipe study\n\nEach table is generated between its `<!-- … -->` markers by `make sweep` / `make "
         "sweep-offline` (tools/sweep.py, the grids in configs/); the fine-tuning defaults in params.yaml are chosen "
         "from them. Do not edit the tables by hand.")
COLUMNS = ("recipe", "knobs", "seeds", "held-out PPL", "÷ base [95%]", "÷ default [95%]", "IF prompt %",
           "IF − base [95%]", "val PPL", "train min")
GRID_KEYS = {"common", "seeds", "default", "heldout", "runs"}
HELDOUT_KEYS = {"records", "seed", "ifeval_prompts", "max_new_tokens"}


@dataclass(frozen=True)
class Grid:
    common: dict
    seeds: list[int]
    default: str
    heldout: dict
    runs: dict[str, dict]


def read_grid(path: Path) -> Grid:
    """The grid file, checked: one line naming the key."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise StageError(f"{path}: cannot read the sweep grid: {exc}") from exc
    if not isinstance(doc, dict) or set(doc) != GRID_KEYS or not isinstance(doc["runs"], dict) or not doc["runs"]:
        raise StageError(f"{path}: the sweep grid needs exactly the keys {', '.join(sorted(GRID_KEYS))} "
                         "(runs: a non-empty mapping)")
    for name, overrides in doc["runs"].items():
        if not isinstance(overrides, dict) or not overrides:
            raise StageError(f"{path}: runs.{name} must be a mapping of params.yaml keys to values")
        if any(k in ("finetune.seed", "data.seed") or k.startswith("base.") for k in overrides):
            raise StageError(f"{path}: runs.{name} may not set the seeds or the base (every run shares them)")
    seeds = doc["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise StageError(f"{path}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    if doc["default"] not in doc["runs"]:
        raise StageError(f"{path}: default {doc['default']!r} is not one of the runs")
    held = doc["heldout"]
    if not isinstance(held, dict) or set(held) != HELDOUT_KEYS or not all(
            isinstance(held[k], int) and held[k] > 0 for k in HELDOUT_KEYS - {"seed"}):
        raise StageError(f"{path}: heldout needs {', '.join(sorted(HELDOUT_KEYS))} (positive integers)")
    return Grid(doc["common"] or {}, seeds, doc["default"], held, doc["runs"])


def exp_name(recipe: str, seed: int) -> str:
    return f"{PREFIX}{recipe}-s{seed}"


def set_args(overrides: dict) -> list[str]:
    """`-S key=value` arguments; values as YAML (null, lists), as DVC parses them."""
    args = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
        text = text.removesuffix("\n...").strip()
        args += ["-S", f"{key}={text}"]
    return args


def queue_commands(grid: Grid, source: Path) -> list[list[str]]:
    base = {"data.source": str(source.resolve()), **grid.common}
    return [["dvc", "exp", "run", "--queue", "--force", "-n", exp_name(name, seed),
             *set_args({**base, **grid.runs[name], "finetune.seed": seed}), "finetune"]
            for name in grid.runs for seed in grid.seeds]


def experiment_env() -> dict[str, str]:
    """The queued experiments run in temporary copies of the workspace: a relative SQLite MLflow store would be
    written there and lost, and the editable library install would import this workspace's (maybe edited)
    source instead of the experiment's own copy."""
    env = dict(os.environ)
    uri = env.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    env["MLFLOW_TRACKING_URI"] = uri
    env["PYTHONPATH"] = os.pathsep.join(filter(None, ["src", env.get("PYTHONPATH")]))
    return env


def call(cmd: list[str], env: dict, capture: bool = False) -> str:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE if capture else None, text=True)
    if proc.returncode:
        raise StageError(f"`{' '.join(cmd[:4])} …` failed (exit {proc.returncode}); see its output above")
    return proc.stdout


# ---------------------------------------------------------------- finished experiments


def finished_experiments(show: list) -> list[dict]:
    """The {rev, name, data} record of every experiment in `dvc exp show --json` that has finished. A queued or
    running one still shows its baseline's metrics files, which are not its results."""
    found = []
    for commit in show:
        for exp in commit.get("experiments") or []:
            state = ((exp.get("executor") or {}).get("state")) or "success"
            found += [rev for rev in exp.get("revs") or [] if state == "success" and isinstance(rev.get("data"), dict)]
    return found


def git_details(rev: str, cwd: str | Path = ".") -> dict | None:
    """The finetune stage's whole record as the experiment's commit holds it."""
    proc = subprocess.run(["git", "show", f"{rev}:{DETAILS}"], cwd=cwd, capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def latest_runs(show: list, grid: Grid, details=git_details) -> dict[str, dict]:
    """exp name → {rev, params, metrics} of the newest finished experiment of each (recipe, seed) of the grid."""
    wanted = {exp_name(r, s) for r in grid.runs for s in grid.seeds}
    latest: dict[str, dict] = {}
    for exp in finished_experiments(show):
        data, name = exp["data"], exp.get("name") or ""
        m = ((data.get("metrics") or {}).get(METRICS) or {}).get("data")
        if name in wanted and m and name not in latest:
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
            latest[name] = {"rev": exp["rev"], "params": params, "metrics": {**m, **(details(exp["rev"]) or {})}}
    return latest


# ---------------------------------------------------------------- the held-out part and its scores


def data_params(grid: Grid, recipe: str, source: Path, params_file: Path) -> DataParams:
    """The `data` section a run of `recipe` prepares with (params.yaml + the grid's data.* overrides)."""
    data = dict(read_params(params_file)["data"])
    for key, value in {**grid.common, **grid.runs[recipe], "data.source": str(source)}.items():
        if key.startswith("data."):
            data[key.removeprefix("data.")] = yaml.safe_load(value) if isinstance(value, str) else value
    return build(DataParams, data, "data")


def heldout_records(grid: Grid, source: Path, heldout_source: Path, params_file: Path) -> list[dict]:
    """`heldout.records` records of `heldout_source` that no run's train or val sample holds."""
    from alpaca_lora_cpu.heldout import pick_heldout
    from alpaca_lora_cpu.records import clean, load_source
    from stages.prepare import sample_split

    sampled: list[dict] = []
    for recipe in grid.runs:
        p = data_params(grid, recipe, source, params_file)
        loaded = load_source(str(source), p.format)
        train, val = sample_split(clean(loaded, p.on_invalid)[0], p, take_all=False)
        sampled += train + val
    pool = clean(load_source(str(heldout_source), "alpaca"), "drop")[0]
    return pick_heldout(pool, sampled, grid.heldout["records"], grid.heldout["seed"])


def fetch(rev: str, path: str, dst: Path) -> Path:
    """An output of an experiment's commit, from the DVC cache."""
    from dvc.api import DVCFileSystem

    DVCFileSystem(".", rev=rev).get(path, str(dst), recursive=True)
    return dst


@dataclass(frozen=True)
class Scoring:
    """What every experiment is scored on, and how."""
    records: list[dict]
    prompts: list[dict]
    template: str
    cutoff: int
    max_new_tokens: int
    threads: int
    base: Path  # the base model (the same for every run: the grid may not change it)

    def tag(self, rev: str | None) -> str:
        import hashlib

        blob = json.dumps([rev, self.records, self.prompts, self.template, self.cutoff, self.max_new_tokens],
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def scores_of(name: str, rev: str | None, how: Scoring) -> dict:
    """The cached scores of one experiment (`rev`; None: the base alone), computed when missing or stale."""
    import tempfile

    from alpaca_lora_cpu.heldout import load, score

    path, tag = SCORES / f"{name}.json", how.tag(rev)
    if path.is_file() and read_json(path, "sweep scores").get("tag") == tag:
        return read_json(path, "sweep scores")
    print(f"scoring {name} on {len(how.records)} held-out records and {len(how.prompts)} IF prompts",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = fetch(rev, "models/adapter", Path(tmp) / "adapter") if rev else None
        model, tokenizer = load(how.base, adapter, how.threads)
        s = score(model, tokenizer, how.records, how.prompts, how.template, how.cutoff, how.max_new_tokens)
    out = {"tag": tag, "name": name, **s.as_dict()}
    write_json(path, out)
    return out


# ---------------------------------------------------------------- the table


def ppl(s: dict) -> float:
    return float(np.exp(np.sum(s["nll"]) / np.sum(s["tokens"])))


def if_rate(s: dict) -> float:
    return float(np.mean([all(x) for x in s["ifeval"]]))


def seed_mean(scores: list[dict]) -> dict:
    """Per record the mean NLL over seeds (token counts are the same), per IF prompt the share of seeds that
    followed it: what the paired comparisons resample."""
    return {"nll": list(np.mean([s["nll"] for s in scores], axis=0)), "tokens": scores[0]["tokens"],
            "if_pass": list(np.mean([[all(x) for x in s["ifeval"]] for s in scores], axis=0))}


def compare(a: dict, b: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """Paired bootstraps of a against b: PPL ratio over the held-out records, IF difference over the prompts."""
    from alpaca_lora_cpu.stats import paired, ratio

    ppl_a, ppl_b = (ratio(-np.asarray(x["nll"]), x["tokens"], "exp_neg") for x in (a, b))
    if_a, if_b = ratio(a["if_pass"]), ratio(b["if_pass"])
    return {"ppl_ratio": paired(ppl_a, ppl_b, np.divide, resamples, 0.95, seed),
            "if_diff": paired(if_a, if_b, np.subtract, resamples, 0.95, seed)}


def mean_sd(xs: list[float]) -> tuple[float, float]:
    x = np.asarray(xs, dtype=np.float64)
    return float(np.mean(x)), float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def knobs(overrides: dict) -> str:
    short = {k.removeprefix("finetune.").removeprefix("lora."): v for k, v in overrides.items()}
    return ", ".join(f"{k}={v}" for k, v in short.items())


def summarize(grid: Grid, runs: dict[str, dict], scores: dict[str, dict], base: dict) -> list[dict]:
    """One row per recipe with every seed finished and scored."""
    base_mean = seed_mean([base])
    done = {r: [exp_name(r, s) for s in grid.seeds if exp_name(r, s) in scores] for r in grid.runs}
    complete = {r: names for r, names in done.items() if len(names) == len(grid.seeds)}
    means = {r: seed_mean([scores[n] for n in names]) for r, names in complete.items()}
    rows = []
    for recipe, names in complete.items():
        vs_base = compare(means[recipe], base_mean)
        vs_default = compare(means[recipe], means[grid.default]) if grid.default in means else None
        m = [runs[n]["metrics"] for n in names]
        rows.append({
            "recipe": recipe, "knobs": knobs(grid.runs[recipe]), "seeds": len(names),
            "ppl": mean_sd([ppl(scores[n]) for n in names]),
            "ratio_base": vs_base["ppl_ratio"], "ratio_default": vs_default and vs_default["ppl_ratio"],
            "if": mean_sd([if_rate(scores[n]) for n in names]), "if_base": vs_base["if_diff"],
            "if_default": vs_default and vs_default["if_diff"],
            "val_ppl": mean_sd([x.get("eval_perplexity") or float("nan") for x in m]),
            "train_min": mean_sd([(x.get("train_seconds") or 0) / 60 for x in m]),
        })
    return rows


def choose(rows: list[dict]) -> dict | None:
    """The default to use: the lowest mean held-out PPL among the recipes whose instruction following is not
    decidedly worse than the base's (the IF difference's interval does not lie wholly below 0)."""
    ok = [r for r in rows if r["if_base"][2] >= 0]
    return min(ok, key=lambda r: r["ppl"][0], default=None)


def _ci(t: tuple | None, fmt: str) -> str:
    return "–" if t is None else f"{fmt.format(t[0])} [{fmt.format(t[1])}, {fmt.format(t[2])}]"


def markdown(rows: list[dict], grid: Grid, base: dict, sources: str, stamp: str, plot: str | None) -> str:
    best = choose(rows)
    n_rec, n_if = len(base["nll"]), len(base["ifeval"])
    lines = [f"Measured {stamp}. {sources} Every recipe ran with the seeds {grid.seeds} (finetune.seed; the data "
             "sample is the same for all). Held-out PPL: response-only perplexity (prompt masked, EOS included) on "
             f"{n_rec} held-out records that no run trains or validates on; mean ± sd over seeds. IF prompt %: "
             f"prompt-level strict accuracy on {n_if} of the bundled instruction-following prompts (if-verifiable), "
             f"greedy, at most {grid.heldout['max_new_tokens']} tokens. ÷ base, ÷ default, IF − base: paired "
             "bootstraps (2,000 resamples) over the same records or prompts, each recipe's seeds averaged; "
             f"default = `{grid.default}`. The base model on the same records: PPL {ppl(base):.3f}, IF "
             f"{100 * if_rate(base):.0f}%. val PPL: the finetune stage's own val split. Each run is a DVC experiment "
             "sweep-<recipe>-s<seed> and an MLflow run tagged dvc_exp_name.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        mark = " **(chosen)**" if r is best else ""
        cells = [r["recipe"] + mark, r["knobs"], str(r["seeds"]), f"{r['ppl'][0]:.3f} ± {r['ppl'][1]:.3f}",
                 _ci(r["ratio_base"], "{:.3f}"), _ci(r["ratio_default"], "{:.3f}"),
                 f"{100 * r['if'][0]:.1f} ± {100 * r['if'][1]:.1f}",
                 _ci(r["if_base"] and tuple(100 * x for x in r["if_base"]), "{:+.1f}"),
                 f"{r['val_ppl'][0]:.3f}", f"{r['train_min'][0]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if best:
        lines += ["", f"Chosen: **{best['recipe']}**, the lowest held-out PPL among the recipes whose instruction "
                      "following is not decidedly worse than the base's."]
    if plot:
        lines += ["", f"![held-out PPL ÷ base against training minutes]({plot})"]
    return "\n".join(lines)


def write_plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        point, lo, hi = r["ratio_base"]
        ax.errorbar([r["train_min"][0]], [point], yerr=[[point - lo], [hi - point]], fmt="o", capsize=3)
        ax.annotate(r["recipe"], (r["train_min"][0], point), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("training minutes (this machine, mean over seeds)")
    ax.set_ylabel("held-out response PPL ÷ base (95% paired)")
    ax.set_title("Recipe study on held-out records (lower is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def section(grid_path: Path) -> str:
    """The docs/recipes.md section (and plot, score-cache prefix) of a grid: `recipes` for configs/sweep.yaml,
    `recipes-<rest>` for configs/sweep-<rest>.yaml."""
    rest = grid_path.stem.removeprefix("sweep").lstrip("-_")
    return f"recipes-{rest}" if rest else "recipes"


def collect(grid: Grid, doc_grid: Path, source: Path, heldout_source: Path, doc: Path, env: dict,
            params_file: Path) -> list[dict]:
    from alpaca_lora_cpu.ifeval import load_prompts

    show = json.loads(call(["dvc", "exp", "show", "--json", "--all-commits"], env, capture=True) or "[]")
    runs = latest_runs(show, grid)
    if not runs:
        raise StageError("no finished sweep experiment in `dvc exp show` (run the sweep first)")
    import tempfile

    config = load_params(params_file)
    records = heldout_records(grid, source, heldout_source, params_file)
    prompts = load_prompts(Path("data/ifeval/prompts.jsonl"))[:grid.heldout["ifeval_prompts"]]
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = fetch(next(iter(runs.values()))["rev"], "models/base", Path(tmp) / "base")
        how = Scoring(records, prompts, config.prompt.template, config.finetune.cutoff_len,
                      grid.heldout["max_new_tokens"], config.evaluate.threads, base_dir)
        base = scores_of(f"{section(doc_grid)}-base", None, how)
        scores = {n: scores_of(n, r["rev"], how) for n, r in runs.items()}
    rows = summarize(grid, runs, scores, base)
    if not rows:
        raise StageError(f"no recipe has all of its seeds {grid.seeds} finished")
    name = section(doc_grid)
    plot = doc.with_name(f"{name}.png")
    write_plot(plot, rows)
    sources = (f"Grid `{doc_grid}`. Training data: `{source.name}` (the grid's sample of it); held-out records: "
               f"`{heldout_source.name}`, outside every run's sample.")
    replace_section(doc, name, markdown(rows, grid, base, sources, machine_stamp(doc), plot.name), title=TITLE)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "grid", "doc")
    ap.add_argument("--source", type=Path, required=True, help="Alpaca JSON/JSONL/parquet file to train from")
    ap.add_argument("--heldout-source", type=Path, help="real Alpaca file the held-out part comes from (default: "
                    "--source)")
    ap.add_argument("--collect", action="store_true", help="only score what is missing and rewrite the table")
    ap.add_argument("--jobs", type=int, default=1, help="experiments at once (each uses every core)")
    args = parse_args(ap, argv)
    load_params(args.params)  # a broken params.yaml would fail every queued experiment: stop here instead
    grid = read_grid(args.grid)
    heldout_source = args.heldout_source or args.source
    for what, path in (("--source", args.source), ("--heldout-source", heldout_source)):
        if not path.is_file():
            raise StageError(f"{what} {path}: no such file")
    env = experiment_env()
    if not args.collect:
        for cmd in queue_commands(grid, args.source):
            call(cmd, env)
        call(["dvc", "exp", "run", "--run-all", "--jobs", str(args.jobs)], env)
    rows = collect(grid, args.grid, args.source, heldout_source, args.doc, env, Path(args.params))
    for r in rows:
        print(f"{r['recipe']}: held-out PPL {r['ppl'][0]:.3f} ± {r['ppl'][1]:.3f}, ÷ base "
              f"{_ci(r['ratio_base'], '{:.3f}')}, IF {100 * r['if'][0]:.1f}%")


if __name__ == "__main__":
    run_cli(main)
