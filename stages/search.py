"""search: a per-tensor-group quantization recipe under a size budget, chosen by measured KLD.

Run: python -m stages.search --params params.yaml --src models/gguf/finetuned-reference.gguf \
         --imatrix models/imatrix/imatrix.gguf --hessians models/imatrix/hessians --data data/prepared \
         --out models/search/recipe.json --candidates reports/search/candidates.csv \
         --metrics reports/metrics/search.json --gptq-blocks models/search/gptq-blocks

1. Calibration: `search.calibration_tokens` tokens of the train split (never the val split the report
   evaluates on), each record prompt + response + EOS. The reference GGUF's next-token distributions on them
   are kept as top-k summaries (src/alpaca_lora_cpu/metrics.py).
2. Sensitivity: with every group at q8_0, each group alone is set to each type of `search.types` its rows fit
   (k-/i-quants need rows divisible by 256; SmolLM2's 576-wide ones take only 32-blocks) and scored: the mean
   KLD over all calibration positions. The model is quantized (with the importance matrix) once per type, every
   group at that type, and each candidate is assembled from those files' tensors (gguf_files.assemble: the same
   bytes llama.cpp writes for that recipe), so the quantizing grows with the number of types, not candidates.
   A `<fmt>-gptq` type (iq4_nl-gptq, q5_0-gptq, q4_0-gptq) is that type's file with every decoder linear
   rounded by GPTQ over the imatrix stage's covariances (`--hessians`, quantize.gptq): one GPTQ pass per type,
   offered to the groups that have covariances (token_embd only as the tied output, quantize.gptq.head). GPTQ
   rounds each tensor from its own weights and H alone, so the tensor's bytes are those quantize@searched
   writes: the blocks are kept (`--gptq-blocks`, gptq.RoundedBlocks) and quantize@searched and
   quantize@iq4_nl-gptq take them from there instead of rounding the same tensors again.
3. Knapsack: the KLD increases are taken as additive; a multiple-choice knapsack over the groups' estimated
   sizes picks the assignments with the smallest total within the budget (`search.budget_mib`, default the
   stock q4_0 file's size).
4. Verify: the best `search.verify` assignments are assembled and measured for real; the best one that fits
   the budget is written as a recipe (the quantize stage builds it as the `searched` entry of quantize.types).
Every candidate's measurement goes to the candidates CSV and MLflow.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import GptqParams, PromptParams, SearchParams, as_dict, load_params
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import atomic_path, ensure_writable, read_jsonl, write_csv, write_json
from alpaca_lora_cpu.openers import load_npz
from alpaca_lora_cpu.variants import tensor_rounding

log = logging.getLogger("search")
# Tensor groups (regex on GGUF names). token_embd is also the output matrix of tied models like SmolLM2.
GROUPS = {
    "token_embd": r"^(token_embd|output)\.weight$",
    "attn_qk": r"\.attn_(q|k)\.weight$",
    "attn_v": r"\.attn_v\.weight$",
    "attn_output": r"\.attn_output\.weight$",
    "ffn_gate_up": r"\.ffn_(gate|up)\.weight$",
    "ffn_down": r"\.ffn_down\.weight$",
}
TOP = "Q8_0"  # the groups' type while another group is measured
MIB = 2**20


@dataclass(frozen=True)
class Group:
    name: str
    tensors: tuple[tuple[str, int, int], ...]  # (name, ncols, elements)
    options: dict[str, float]  # GGML type → bytes of the group's tensors in it (only types its rows fit)


# ---------------------------------------------------------------- sizes, without quantizing


def tensor_bytes(ttype: str, ncols: int, elements: int) -> float | None:
    """Stored bytes of a tensor in `ttype` (IQ4_NL-GPTQ: IQ4_NL's), or None when its rows do not divide into the
    type's blocks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[tensor_rounding(ttype)[0]]]
    return None if ncols % block else elements / block * size


def build_groups(infos: list, types: tuple[str, ...], covered=None) -> tuple[list[Group], float]:
    """The groups with their size per fitting type, and the bytes of everything outside them (norms, …). A -gptq
    type is offered only to groups whose every tensor has an input covariance (`covered(name)`)."""
    groups, grouped = [], set()
    for name, pattern in GROUPS.items():
        tensors = tuple((t.name, t.shape[0], t.n_elements) for t in infos if re.search(pattern, t.name))
        if not tensors:
            continue
        grouped |= {t[0] for t in tensors}
        options = {}
        for ttype in dict.fromkeys([*(t.upper() for t in types), TOP]):
            if tensor_rounding(ttype)[1] and not (covered and all(covered(n) for n, _, _ in tensors)):
                continue
            sizes = [tensor_bytes(ttype, ncols, n) for _, ncols, n in tensors]
            if all(s is not None for s in sizes):
                options[ttype] = float(sum(sizes))
        groups.append(Group(name, tensors, options))
    rest = sum(t.n_bytes for t in infos if t.name not in grouped)
    return groups, float(rest)


def recipe_of(assignment: dict[str, str]) -> dict:
    """A quantize.recipes entry for an assignment {group: GGML type}: q8_0 level, imatrix, per-group overrides."""
    emb = assignment.get("token_embd", TOP).lower()
    overrides = {GROUPS[g]: t.lower() for g, t in assignment.items() if g != "token_embd"}
    return {"type": "q8_0", "imatrix": True, "token_embedding": emb, "output": emb, "overrides": overrides}


def knapsack(groups: list[Group], cost: dict[tuple[str, str], float], budget: float, top_n: int,
             step: int = 64 * 1024) -> list[tuple[float, dict[str, str]]]:
    """The `top_n` assignments with the smallest summed cost whose summed size fits `budget` bytes
    (multiple-choice knapsack over sizes rounded up to `step`); [(cost, assignment)], best first."""
    cap = int(budget) // step
    frontier: dict[int, list[tuple[float, dict[str, str]]]] = {0: [(0.0, {})]}
    for g in groups:
        nxt: dict[int, list[tuple[float, dict[str, str]]]] = {}
        for used, sols in frontier.items():
            for ttype, size in g.options.items():
                u = used + -(-int(np.ceil(size)) // step)  # bytes rounded up to whole steps
                if u > cap:
                    continue
                for c, a in sols:
                    nxt.setdefault(u, []).append((c + cost[g.name, ttype], {**a, g.name: ttype}))
        # keep, per size, only the best few: enough for the top_n overall (no pruning across sizes: the cheapest
        # partial assignments are the largest, and may not leave room for the groups still to come)
        frontier = {u: sorted(s, key=lambda x: x[0])[:top_n] for u, s in nxt.items()}
    ranked = sorted((x for s in frontier.values() for x in s), key=lambda x: x[0])
    unique, seen = [], set()
    for c, a in ranked:
        key = tuple(sorted(a.items()))
        if key not in seen:
            seen.add(key)
            unique.append((c, a))
    return unique[:top_n]


# ---------------------------------------------------------------- measuring (in child processes)


def _reference(src: str, texts: list[str], max_tokens: int, top_k: int, out: str, threads: int) -> int:
    """Tokenize the calibration texts with the GGUF's tokenizer, keep the reference's top-k summaries."""
    from alpaca_lora_cpu.llama import all_logits, open_llama, tokenize
    from alpaca_lora_cpu.metrics import log_probs, top_k_summary

    seqs, total = [], 0
    with open_llama(src, n_ctx=1024, threads=threads, logits_all=True, in_child=True) as llm:
        for text in texts:
            ids = tokenize(llm, text)[:512]
            ids = ids[:max_tokens - total]
            if len(ids) < 2:
                break
            seqs.append(ids)
            total += len(ids)
        parts = [top_k_summary(log_probs(all_logits(llm, ids)[:-1]), np.array(ids[1:]), top_k) for ids in seqs]
    np.savez(out, lengths=np.array([len(s) for s in seqs]), ids=np.concatenate([np.array(s) for s in seqs]),
             top_ids=np.concatenate([p.ids for p in parts]), top_logp=np.concatenate([p.logp for p in parts]),
             tail=np.concatenate([p.tail_logp for p in parts]), target=np.concatenate([p.target_logp for p in parts]))
    return total


def plan_of(name: str, assignment: dict[str, str]):
    """The quantizer's plan for an assignment {group: GGML type}: its recipe (recipe_of) as llama.cpp is asked."""
    from alpaca_lora_cpu.quantizer import Plan

    r = recipe_of(assignment)
    return Plan(name, r["type"], True, r["token_embedding"].upper(), r["output"].upper(),
                tuple((k, v.upper()) for k, v in r["overrides"].items()), recipe=True)


def _quantize_types(src: str, imatrix: str, work: str, types: dict[str, dict[str, str]], threads: int
                    ) -> dict[str, str]:
    """In a child: one llama.cpp quantization per type, every group whose rows fit it at that type (the rest q8_0);
    type → file. Every candidate is then assembled from these files' tensors, never quantized again."""
    from tqdm import tqdm

    from alpaca_lora_cpu.quantizer import quantize_here

    files = {}
    for ttype, assignment in tqdm(types.items(), desc="search: quantize each type once", unit="type"):
        dst = str(Path(work) / f"type-{ttype.lower()}.gguf")
        rc, _, lines = quantize_here(src, dst, plan_of(f"type-{ttype}", assignment), threads, imatrix)
        if rc != 0:
            raise StageError(f"llama.cpp's quantizer failed on the search's {ttype} pass: {(lines or ['?'])[-1][:200]}")
        check_types(dst, plan_of(ttype, assignment))
        files[ttype] = dst
    return files


def gptq_files(files: dict[str, str], gptq_types: list[str], src: str, hessians: Path, options: GptqParams,
               work: str, blocks: Path | None = None) -> dict[str, str]:
    """One GPTQ pass per -gptq type: its llama.cpp type file with every decoder linear stored in that type
    rounded by GPTQ (gptq.make, as quantize@searched rounds them); type → file. `blocks`: a folder to keep the
    rounded blocks in (gptq.RoundedBlocks), which quantize@iq4_nl-gptq and quantize@searched then reuse."""
    from tqdm import tqdm

    from alpaca_lora_cpu.gptq import Hessians, RoundedBlocks, make, rounded_by

    h = Hessians(hessians)
    only = rounded_by(None, options.head)
    store = RoundedBlocks(blocks, writable=True) if blocks is not None else None
    out = {}
    for ttype in tqdm(gptq_types, desc="search: GPTQ each -gptq type once", unit="type"):
        dst = Path(work) / f"type-{ttype.lower()}.gguf"
        make(Path(files[tensor_rounding(ttype)[0]]), Path(src), h, options.damp, dst, act_order=options.act_order,
             only=only, store=store)
        out[ttype] = str(dst)
    if store is not None:
        store.save()
    return out


def _score_all(files: dict[str, str], groups: list, assignments: list[dict[str, str]], dst: str, ref: str,
               threads: int, desc: str) -> list[tuple[float, int]]:
    """In a child: each assignment assembled from the per-type files (gguf_files.assemble) and scored:
    [(mean KLD against the reference over the calibration positions, bytes)]."""
    from tqdm import tqdm

    from alpaca_lora_cpu.gguf_files import assemble, tensor_infos

    names = {g.name: [t[0] for t in g.tensors] for g in groups}
    out = []
    for assignment in tqdm(assignments, desc=desc, unit="candidate"):
        sources = {n: files[ttype] for g, ttype in assignment.items() for n in names[g]}
        assemble(files[TOP], sources, dst)
        wrong = [t.name for t in tensor_infos(dst)
                 if t.name in sources and t.type != tensor_rounding(assignment_of(t.name, assignment))[0]]
        if wrong:
            raise StageError(f"internal: the assembled candidate stores {wrong[0]} in another type than asked")
        out.append((score(dst, ref, threads), os.path.getsize(dst)))
        os.remove(dst)
    return out


def assignment_of(tensor: str, assignment: dict[str, str]) -> str | None:
    """The type an assignment gives a tensor (by its group), or None."""
    return next((t for g, t in assignment.items() if re.search(GROUPS[g], tensor)), None)


def score(path: str, ref: str, threads: int) -> float:
    """Mean KLD of a GGUF against the reference's top-k summaries over every calibration position."""
    from alpaca_lora_cpu.llama import all_logits, open_llama
    from alpaca_lora_cpu.metrics import TopK, compare_logits

    z = load_npz(ref, ("lengths", "ids", "top_ids", "top_logp", "tail", "target"), "search calibration")
    klds, start, pos = [], 0, 0
    # this runs in a child already (the stage's call_in_child): no preflight child of its own per candidate
    with open_llama(path, n_ctx=1024, threads=threads, logits_all=True, in_child=True) as llm:
        for n in z["lengths"]:
            ids = z["ids"][start:start + n].tolist()
            sl = slice(pos, pos + n - 1)
            ref_k = TopK(z["top_ids"][sl], z["top_logp"][sl], z["tail"][sl], z["target"][sl])
            klds.append(compare_logits(ref_k, all_logits(llm, ids)[:-1], np.asarray(ids[1:]))["kld"])
            start, pos = start + n, pos + n - 1
    return float(np.mean(np.concatenate(klds)))


def check_types(path: str, plan) -> None:
    """Every grouped tensor got the type the plan asks: llama.cpp may override a request it cannot honour."""
    from alpaca_lora_cpu.gguf_files import tensor_infos
    from alpaca_lora_cpu.quantizer import recipe_type

    wrong = [(t.name, t.type, want) for t in tensor_infos(path)
             if (want := recipe_type(plan, t.name)) is not None and t.type != want]
    if wrong:
        name, got, want = wrong[0]
        raise StageError(f"llama.cpp stored {name} as {got}, not the {want} the candidate asks "
                         f"({len(wrong)} tensor(s) differ)")


# ---------------------------------------------------------------- the search


def calibration_texts(data: Path, template: str, src: Path) -> list[str]:
    """Train records whole, in `prompt.template` (a chat template is the reference GGUF's own), as trained on."""
    from alpaca_lora_cpu.gguf_files import chat_template, check_gguf, eos_text
    from alpaca_lora_cpu.prompts import full_text, to_turns

    records = read_jsonl(data / "train.jsonl", "train split", "run the prepare stage first", records=True)
    reader = check_gguf(src)
    chat, eos = chat_template(reader), eos_text(reader) or ""
    try:
        return [full_text(to_turns(r, template, chat), eos) for r in records]
    except ValueError as exc:
        raise StageError(f"prompt.template {template}: {exc} ({src})") from exc


def stock_q4_0_bytes(src: Path, work: Path, threads: int) -> int:
    from alpaca_lora_cpu.native import call_in_child
    from alpaca_lora_cpu.quantizer import Plan, quantize_here

    dst = work / "stock-q4_0.gguf"
    rc, _, _ = call_in_child(quantize_here, str(src), str(dst), Plan("q4_0", "q4_0", False), threads, None, file=src,
                             action="quantizing q4_0 for the budget")
    if rc != 0:
        raise StageError(f"llama.cpp could not quantize {src} to q4_0 for the search budget")
    size = dst.stat().st_size
    dst.unlink()
    return size


def covered_by(hessians: Path | None, types: tuple[str, ...], head: bool = True):
    """name → whether GPTQ may round the tensor: it has an input covariance (gptq.shared_name), and is not the
    output matrix unless `head` (quantize.gptq.head); None when no -gptq type is asked. StageError when one is
    asked and the covariances are missing."""
    if not any(tensor_rounding(t)[1] for t in types):
        return None
    from alpaca_lora_cpu.gptq import Hessians, rounded_by, shared_name

    if hessians is None:
        raise StageError("search.types has -gptq types: pass --hessians (the imatrix stage's covariance folder)")
    h, allowed = Hessians(hessians), rounded_by(None, head)
    return lambda name: shared_name(name) in h and (allowed is None or allowed(name))


def run(params: SearchParams, prompt: PromptParams, src: Path, imatrix: Path, data: Path, mlflow=None,
        hessians: Path | None = None, gptq: GptqParams | None = None, blocks: Path | None = None
        ) -> tuple[dict, list[dict], dict]:
    """(recipe, candidate rows, metrics). `blocks`: the folder to keep the -gptq types' rounded blocks in (made,
    with an empty index, even when there is none, so that the stage's output always exists)."""
    from alpaca_lora_cpu.gguf_files import tensor_infos
    from alpaca_lora_cpu.gptq import RoundedBlocks
    from alpaca_lora_cpu.native import call_in_child

    if not imatrix.is_file():
        raise StageError(f"{imatrix} not found: run the imatrix stage first")
    threads = os.cpu_count() or 1
    started = time.time()
    infos = tensor_infos(src)
    groups, rest = build_groups(infos, params.types, covered_by(hessians, params.types, gptq is None or gptq.head))
    # the file also holds metadata (the tokenizer's vocabulary, …) and alignment: count it against the budget
    rest += src.stat().st_size - sum(t.n_bytes for t in infos)
    texts = calibration_texts(data, prompt.template, src)
    with tempfile.TemporaryDirectory(prefix="search-", dir=src.parent) as tmp:
        work = Path(tmp)
        budget = params.budget_mib * MIB if params.budget_mib else stock_q4_0_bytes(src, work, threads)
        smallest = rest + sum(min(g.options.values()) for g in groups)
        if smallest > budget:  # known before any candidate is measured
            raise StageError(f"no assignment of search.types fits {budget / MIB:.1f} MiB (the smallest needs "
                             f"{smallest / MIB:.1f} MiB): raise search.budget_mib or add smaller search.types")
        ref = str(work / "reference.npz")
        tokens = call_in_child(_reference, str(src), texts, params.calibration_tokens, params.top_k, ref, threads,
                               file=src, action="scoring the reference")
        log.info("budget %.1f MiB; %d calibration tokens; groups: %s", budget / MIB, tokens,
                 ", ".join(f"{g.name} ({'/'.join(t.lower() for t in g.options)})" for g in groups))
        # llama.cpp's pass per type (a -gptq type's too: GPTQ starts from its file), every group it may take
        per_type = {b: ({} if b == TOP else {g.name: b for g in groups
                                             if any(tensor_rounding(t)[0] == b for t in g.options)})
                    for b in dict.fromkeys(tensor_rounding(t)[0] for g in groups for t in g.options)}
        files = call_in_child(_quantize_types, str(src), str(imatrix), str(work), per_type, threads, file=src,
                              action="quantizing the search's types")
        gptq_types = list(dict.fromkeys(t for g in groups for t in g.options if tensor_rounding(t)[1]))
        t0 = time.time()
        if gptq_types:
            if gptq is None:
                raise StageError("search.types has -gptq types but no quantize.gptq options were given")
            files |= gptq_files(files, gptq_types, str(src), hessians, gptq, str(work), blocks)
        elif blocks is not None:
            RoundedBlocks(blocks, writable=True).save()
        gptq_seconds = time.time() - t0
        rows: list[dict] = []

        def measure(assignments: list[dict[str, str]], phase: str) -> list[tuple[float, int]]:
            results = call_in_child(_score_all, files, groups, assignments, str(work / "candidate.gguf"), ref,
                                    threads, f"search {phase}", file=src, action=f"measuring search {phase} candidates")
            for assignment, (kld, size) in zip(assignments, results, strict=True):
                rows.append({"phase": phase, **{g.name: assignment.get(g.name, TOP).lower() for g in groups},
                             "size_mib": size / MIB, "kld_mean": kld})
                if mlflow is not None:
                    mlflow.log_metrics({"search_kld": kld, "search_mib": size / MIB}, step=len(rows))
            return results

        jobs = [(g.name, t) for g in groups for t in g.options if t != TOP]
        # first the baseline (all q8_0), then each group alone at each of its other types
        results = measure([{}] + [{gname: ttype} for gname, ttype in jobs], "sensitivity")
        base_kld = results[0][0]
        cost = {(g.name, TOP): 0.0 for g in groups}
        for (gname, ttype), (kld, _) in zip(jobs, results[1:], strict=True):
            cost[gname, ttype] = max(kld - base_kld, 0.0)
        solutions = knapsack(groups, cost, budget - rest, params.verify)
        checked = measure([a for _, a in solutions], "verify")
        verified = [(kld, size, predicted, a) for (kld, size), (predicted, a) in zip(checked, solutions, strict=True)]
    fitting = [v for v in verified if v[1] <= budget] or sorted(verified, key=lambda v: v[1])[:1]
    kld, size, predicted, best = min(fitting, key=lambda v: v[0])
    recipe = recipe_of(best)
    metrics = {"budget_mib": budget / MIB, "calibration_tokens": tokens, "candidates": len(rows),
               "quantized_types": len(per_type), "gptq_types": len(gptq_types), "gptq_seconds": gptq_seconds,
               "baseline_kld": base_kld, "winner_kld": kld,
               "winner_predicted_kld": base_kld + predicted, "winner_mib": size / MIB,
               "winner_fits_budget": int(size <= budget), "seconds": time.time() - started}
    log.info("winner: %s — %.1f MiB, calibration KLD %.4f", ", ".join(f"{g}={t.lower()}" for g, t in best.items()),
             size / MIB, kld)
    return recipe, rows, metrics


# The flat numbers (search.json); the whole record goes to search.details.json.
METRICS = ["winner_kld", "winner_mib", "winner_predicted_kld", "winner_fits_budget", "baseline_kld", "budget_mib",
           "candidates", "quantized_types", "gptq_types", "gptq_seconds", "calibration_tokens", "seconds"]


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "src", "imatrix", "data", "out", "candidates", "metrics")
    ap.add_argument("--hessians", type=Path, help="the imatrix stage's input covariances, for -gptq search.types")
    ap.add_argument("--gptq-blocks", type=Path, required=True,
                    help="the folder to keep the -gptq types' rounded blocks in, for the quantize stage to reuse")
    args = parse_args(ap, argv)
    config = load_params(args.params)
    ensure_writable(args.out, args.candidates, args.metrics, args.gptq_blocks)
    from alpaca_lora_cpu.cost import check_mapped

    check_mapped("search", args.src, "convert.outtype (q8_0: a smaller reference)")
    from alpaca_lora_cpu.tracking import stage_run, write_stage_metrics

    logged = {"search": as_dict(config.search), "prompt": as_dict(config.prompt),
              "quantize": {"gptq": as_dict(config.quantize.gptq)}}
    with stage_run("search", logged) as mlflow, atomic_path(args.gptq_blocks) as blocks:
        recipe, rows, metrics = run(config.search, config.prompt, args.src, args.imatrix, args.data, mlflow,
                                    args.hessians, config.quantize.gptq, blocks)
        write_csv(args.candidates, rows, list(rows[0]))
        write_json(args.out, recipe)
        write_stage_metrics(mlflow, args.metrics, metrics, METRICS)
        mlflow.log_dict(recipe, "recipe.json")
        mlflow.log_artifact(str(args.candidates))
    log.info("recipe → %s (%d candidates in %.0f s)", args.out, metrics["candidates"], metrics["seconds"])


if __name__ == "__main__":
    run_cli(main)
