"""GPTQ rounding (Frantar et al., 2022) written into ggml's own 32-weight blocks: Q4_0, Q5_0 and IQ4_NL.

llama.cpp rounds each block to its nearest grid points, weighted by the imatrix: the diagonal of each layer's
input covariance H = Σ x xᵀ. GPTQ uses all of H: it rounds a weight column at a time and pushes each column's
rounding error, through H's inverse Cholesky factor, into the columns not yet rounded, so that the layer's
output error tr(ΔW H ΔWᵀ) (the "proxy error") falls, not each weight's own.

In ggml's layout a block is 32 consecutive weights of a row, i.e. 32 input columns, so GPTQ's groups are the
format's blocks: when the pass reaches a block's first column, each row's scale is searched on the
error-updated weights (`block_scales`, H's diagonal as weights, then least squares for its codes). `refit`
(each row's scales refit jointly by least squares on the full H after the pass) is opt-in: it lowered the
summed proxy error a further 14% on the 135M model's q4_0 but raised held-out KLD from 0.108 to 0.249 (make
bench-gptq, docs/benchmarks.md): jointly fit scales follow the calibration tokens' few huge-activation
directions, which the held-out text does not share.
The result is the exact block bytes (`pack`), which `write` puts in place of llama.cpp's in a copy of llama.cpp's
file of the same level: same types, size, metadata and every other tensor.

Used by the quantize stage's -gptq levels (over the covariance folder the imatrix stage writes: `Hessians`) and
tools/bench_gptq.py (make bench-gptq). The search stage rounds its -gptq types once and keeps the blocks
(`RoundedBlocks`, models/search/gptq-blocks); quantize@iq4_nl-gptq and quantize@searched take a tensor's blocks
from there when everything they are a function of is the same, instead of rounding it a second time.
Cost per weight matrix (rows × cols): one Cholesky of cols × cols, rows × cols² flops for the error updates
(as one matmul per block), and a Python step per column.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alpaca_lora_cpu.errors import StageError

BLOCK = 32  # weights per block in Q4_0 and IQ4_NL (QK4_0, QK4_NL)
BLOCKS_INDEX = "index.json"  # RoundedBlocks' key → tensor, bytes, GPTQ's proxy error
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl


@dataclass(frozen=True)
class BlockFormat:
    """A ggml format of 32 codes (4 or 5 bits) and one fp16 scale a block: weight = d · values[code]."""
    ggml_type: str               # the GGUF type name
    values: tuple[int, ...]      # code → level, ascending
    anchors: tuple[float, ...]   # the scale search's d = m · s / anchor (m: the block's largest-magnitude weight)

    @property
    def uniform(self) -> bool:
        return self.values == tuple(range(self.values[0], self.values[0] + len(self.values)))


FORMATS = {"q4_0": BlockFormat("Q4_0", tuple(range(-8, 8)), (-8.0, 7.0)),
           "q5_0": BlockFormat("Q5_0", tuple(range(-16, 16)), (-16.0, 15.0)),
           "iq4_nl": BlockFormat("IQ4_NL", IQ4_NL_VALUES, (-127.0, 113.0))}
TABLE_MIN = 65536  # codes: elements from which a lookup table beats bucketize (measured, 2-core Xeon)
SEARCH = (0.70, 1.10, 21)  # multipliers s of each anchor's scale tried: linspace(start, stop, count)


def codes(x: Any, fmt: BlockFormat) -> Any:
    """The nearest code of each x = w / d. Q4_0 / Q5_0 are llama.cpp's own arithmetic (quantize_row_q4_0_ref,
    _q5_0_ref): min(15, (int)(x + 8.5)) / min(31, (int)(x + 16.5)) in fp32, so ties round up; IQ4_NL: the
    nearest level, ties to the upper one."""
    import torch

    if fmt.uniform:
        return torch.clamp(torch.floor(x + (0.5 - fmt.values[0])), 0, len(fmt.values) - 1).to(torch.long)
    v = torch.tensor(fmt.values, dtype=torch.float32)
    mids = (v[1:] + v[:-1]) / 2
    if x.numel() < TABLE_MIN:
        return torch.bucketize(x.contiguous(), mids, right=True)
    # The levels are integers, so every midpoint is a multiple of 1/2, and "midpoints ≤ x" depends on x only
    # through floor(2x) (exact in fp32): a table over that grid gives bucketize(x, midpoints, right=True) in a
    # few elementwise passes. bucketize's binary search was most of the scale search's time (block_scales: rows
    # × 42 candidates × 32 at once): an IQ4_NL GPTQ of a 576 × 1536 weight 0.77 → 0.60 s, the same codes (2-core
    # Xeon). One column's codes stay with bucketize, one call being cheaper there. tests/test_gptq.py checks
    # the two agree, ties and out-of-range values included.
    lo, hi = 2 * fmt.values[0] - 2, 2 * fmt.values[-1] + 2
    table = torch.bucketize(torch.arange(lo, hi + 1, dtype=torch.float32) / 2, mids, right=True)
    return table[(torch.floor(2 * x).clamp(lo, hi) - lo).to(torch.long)]


def _inverse(d: Any) -> Any:
    import torch

    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def block_scales(w: Any, h: Any, fmt: BlockFormat, search: bool) -> Any:
    """Each row's scale for the block `w` (rows × 32): without `search`, llama.cpp's plain one (largest-magnitude
    weight / the format's first anchor); with it, the candidate (each anchor × SEARCH, then least-squares
    refit for its codes) of least Σ h (w − d·v)²."""
    import torch

    m = w.gather(1, w.abs().argmax(1, keepdim=True))  # rows × 1, signed
    if not search:
        return (m / fmt.anchors[0])[:, 0]
    s = torch.linspace(*SEARCH, dtype=torch.float32)
    d = torch.cat([m * (s / a) for a in fmt.anchors], 1)  # rows × candidates
    v = torch.tensor(fmt.values, dtype=torch.float32)[codes(w[:, None, :] * _inverse(d)[:, :, None], fmt)]
    hv = h * v
    d = torch.where((hv * v).sum(-1) > 0, (hv * w[:, None, :]).sum(-1) / (hv * v).sum(-1).clamp_min(1e-30), d)
    err = (h * (w[:, None, :] - d.half().float()[:, :, None] * v) ** 2).sum(-1)
    return d.gather(1, err.argmin(1, keepdim=True))[:, 0]


def _round_columns(w1: Any, u1: Any, d16: Any, inv: Any, fmt: BlockFormat, values: Any) -> tuple[Any, Any]:
    """GPTQ's inner loop over a run of columns `w1` (rows × n, updated in place), `u1` its n × n block of the
    upper inverse-Cholesky factor, `d16` / `inv` each column's fp16 scale and fp32 inverse (rows × n):
    (each column's scaled error, for the update of the later columns, and the codes)."""
    import torch

    rows, n = w1.shape
    err, q = torch.empty(rows, n), torch.empty(rows, n, dtype=torch.long)
    for j in range(n):
        c = codes(w1[:, j] * inv[:, j], fmt)
        e = (w1[:, j] - d16[:, j] * values[c]) / u1[j, j]
        w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
        err[:, j], q[:, j] = e, c
    return err, q


def _inverse_cholesky(h: Any) -> Any:
    """The upper Cholesky factor of H⁻¹ (fp32), which GPTQ's error updates use."""
    import torch

    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(torch.float32)


def gptq(weight: Any, hessian: Any, fmt: BlockFormat, damp: float, search: bool = True, act_order: bool = False
         ) -> tuple[Any, Any]:
    """GPTQ of `weight` (rows × cols, fp32) over `hessian` (cols × cols, Σ x xᵀ): (fp32 scales rows × blocks,
    codes rows × cols). `damp` adds damp · mean(diag H) to H's diagonal (GPTQ's percdamp).

    `act_order` rounds the columns in order of falling diag(H) (GPTQ's desc_act), so the columns that matter most
    are rounded first and the error goes to those that matter less. ggml's blocks are fixed runs of 32 columns, so
    the scales are then fixed before the pass (GPTQ's static groups), searched on the weights as they come."""
    import torch

    w = weight.detach().to(torch.float32).clone()
    rows, cols = w.shape
    if cols % BLOCK:
        raise StageError(f"a {rows} × {cols} weight: rows must be whole {BLOCK}-weight blocks")
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    diag = torch.diagonal(h).clone()
    h += damp * diag.mean() * torch.eye(cols, dtype=torch.float64)
    diag = diag.to(torch.float32)
    values = torch.tensor(fmt.values, dtype=torch.float32)
    if act_order:
        return _gptq_act_order(w, h, diag, fmt, search, values)
    u = _inverse_cholesky(h)
    scales = torch.empty(rows, cols // BLOCK)
    q = torch.empty(rows, cols, dtype=torch.long)
    for b in range(cols // BLOCK):
        i1, i2 = b * BLOCK, (b + 1) * BLOCK
        d = block_scales(w[:, i1:i2], diag[i1:i2], fmt, search)
        d16, inv = (x[:, None].expand(rows, BLOCK) for x in (d.half().float(), _inverse(d)))
        err, q[:, i1:i2] = _round_columns(w[:, i1:i2], u[i1:i2, i1:i2], d16, inv, fmt, values)
        if i2 < cols:
            w[:, i2:] -= err @ u[i1:i2, i2:]
        scales[:, b] = d
    return scales, q


def _gptq_act_order(w: Any, h: Any, diag: Any, fmt: BlockFormat, search: bool, values: Any) -> tuple[Any, Any]:
    """gptq's pass in order of falling diag(H), each block's scale fixed first (see gptq)."""
    import torch

    rows, cols = w.shape
    scales = torch.stack([block_scales(w[:, i:i + BLOCK], diag[i:i + BLOCK], fmt, search)
                          for i in range(0, cols, BLOCK)], 1)
    perm = torch.argsort(diag, descending=True, stable=True)  # equal diagonals keep their order
    u = _inverse_cholesky(h[perm][:, perm])
    wp = w[:, perm].contiguous()
    d16, inv = scales.half().float()[:, perm // BLOCK], _inverse(scales)[:, perm // BLOCK]
    q = torch.empty(rows, cols, dtype=torch.long)
    for i1 in range(0, cols, BLOCK):
        i2 = i1 + BLOCK
        err, q[:, perm[i1:i2]] = _round_columns(wp[:, i1:i2], u[i1:i2, i1:i2], d16[:, i1:i2], inv[:, i1:i2], fmt,
                                                values)
        if i2 < cols:
            wp[:, i2:] -= err @ u[i1:i2, i2:]
    return scales, q


def dequantize(scales: Any, q: Any, fmt: BlockFormat) -> Any:
    """What the block bytes decode to (fp16 scale × level, in fp32): gguf-py's and ggml's dequantization."""
    import torch

    v = torch.tensor(fmt.values, dtype=torch.float32)[q]
    return (scales.half().float().repeat_interleave(BLOCK, 1) * v)


def proxy_error(weight: Any, approx: Any, hessian: Any) -> Any:
    """Each row's tr-term (w − ŵ) H (w − ŵ)ᵀ: the layer's summed squared output error over the calibration
    tokens that H was summed over."""
    e = (weight.float() - approx.float()).double()
    return ((e @ hessian.double()) * e).sum(1)


def refit(weight: Any, hessian: Any, scales: Any, q: Any, fmt: BlockFormat, rows_at_once: int = 0) -> Any:
    """Each row's block scales refit for its final codes by least squares on the full H:
    d = (Kᵀ H K)⁻¹ Kᵀ H w, K the row's levels placed block by block; a row keeps its old scales unless the refit
    (after fp16 rounding) lowers its proxy error."""
    import torch

    rows, cols = weight.shape
    nb = cols // BLOCK
    h = hessian.double()
    hb = h.reshape(nb, BLOCK, nb, BLOCK)
    values = torch.tensor(fmt.values, dtype=torch.float64)
    step = rows_at_once or max(1, (1 << 25) // (cols * nb))
    out = scales.clone()
    for r0 in range(0, rows, step):
        k = values[q[r0:r0 + step]].reshape(-1, nb, BLOCK)
        w = weight[r0:r0 + step].double()
        a = torch.einsum("rcj,bicj->rbic", k, hb)
        m = torch.einsum("rbi,rbic->rbc", k, a)
        rhs = torch.einsum("rbi,rbi->rb", k, (w @ h).reshape(-1, nb, BLOCK))
        m = m + 1e-9 * torch.diagonal(m, dim1=1, dim2=2).mean(1).clamp_min(1e-30)[:, None, None] * torch.eye(nb)
        new = torch.linalg.solve(m, rhs[..., None])[..., 0].float()
        old = scales[r0:r0 + step]
        better = (proxy_error(w, dequantize(new, q[r0:r0 + step], fmt), h)
                  < proxy_error(w, dequantize(old, q[r0:r0 + step], fmt), h))
        out[r0:r0 + step] = torch.where(better[:, None] & torch.isfinite(new), new, old)
    return out


def pack(scales: Any, q: Any, fmt: BlockFormat) -> bytes:
    """ggml's block bytes: fp16 d, then qs[j] = low nibble of code[j] | code[j + 16]'s << 4 (block_q4_0,
    block_iq4_nl); Q5_0 (block_q5_0) puts code[k]'s fifth bit at bit k of a little-endian uint32 qh between."""
    import torch

    d = scales.half().numpy().astype("<f2").view(np.uint8).reshape(*scales.shape, 2)
    c = q.to(torch.uint8).numpy().reshape(*scales.shape, BLOCK)
    qs = (c[..., :BLOCK // 2] & 0x0F) | ((c[..., BLOCK // 2:] & 0x0F) << 4)
    if len(fmt.values) == 16:
        return np.concatenate([d, qs], -1).tobytes()
    qh = ((c >> 4).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)).sum(-1, dtype=np.uint32)
    return np.concatenate([d, qh.astype("<u4").view(np.uint8).reshape(*scales.shape, 4), qs], -1).tobytes()


# q/k/v read one input, gate/up another: their covariance is summed once, under the first name.
SHARED = {"attn_k": "attn_q", "attn_v": "attn_q", "ffn_up": "ffn_gate"}


def shared_name(name: str) -> str:
    """blk.3.attn_v.weight → blk.3.attn_q.weight: the tensor whose input covariance this one uses."""
    parts = name.split(".")
    if len(parts) == 4 and parts[2] in SHARED:
        return ".".join([parts[0], parts[1], SHARED[parts[2]], parts[3]])
    return name


HEAD_NAMES = ("output.weight", "token_embd.weight")  # the output matrix's GGUF name: untied, tied


def head_name(config: Any) -> str:
    """The GGUF name of the output matrix, whose input covariance is the final norm's output: token_embd.weight
    when the model ties it to the embedding (SmolLM2), else output.weight."""
    return HEAD_NAMES[bool(getattr(config, "tie_word_embeddings", False))]


def covariances(config: Any, get: Callable[[str], Any], sequences: list[list[int]],
                progress: Callable[[int], None] | None = None, batch_tokens: int = 4096) -> tuple[dict, int]:
    """Σ x xᵀ (fp64) of every decoder linear's input over `sequences`, keyed by GGUF tensor name (the shared
    ones once, see SHARED), all held in memory (the imatrix stage writes them a layer at a time instead), from
    the imatrix's own pass (imatrix.collect); and the token count."""
    from alpaca_lora_cpu.imatrix import collect

    sums: dict[str, Any] = {}
    collect(config, get, sequences, progress, batch_tokens, covariance=lambda _, layer: sums.update(layer))
    return sums, sum(map(len, sequences))


HESSIANS_INDEX = "hessians.json"  # in the covariance folder: token count, layers, the files' tensor names


def write_layer_hessians(folder: Path, layer: int, sums: dict[str, Any]) -> None:
    """One decoder layer's input covariances (GGUF names, see SHARED) as `blk.<layer>.safetensors`, fp32: the
    folder holds one layer at a time in memory, whatever the model's size. Layer num_hidden_layers: the head's."""
    import torch
    from safetensors.torch import save_file

    save_file({n: h.to(torch.float32).contiguous() for n, h in sorted(sums.items())},
              str(folder / f"blk.{layer}.safetensors"))


def write_hessians_index(folder: Path, tokens: int, layers: int) -> None:
    """The folder's index (written last: a folder without it is not a covariance folder)."""
    import json

    from safetensors import safe_open

    names = {}
    for i in range(layers + (folder / f"blk.{layers}.safetensors").is_file()):  # the layers, then the head's
        with safe_open(str(folder / f"blk.{i}.safetensors"), "pt") as f:
            names.update({n: f"blk.{i}.safetensors" for n in f.keys()})
    (folder / HESSIANS_INDEX).write_text(json.dumps({"tokens": tokens, "layers": layers, "dtype": "float32",
                                                     "tensors": names}, indent=1, sort_keys=True) + "\n")


class Hessians:
    """The imatrix stage's covariance folder, read one tensor at a time: `name in h`, `h[name]` (fp64) for a
    shared GGUF name (shared_name), `h.tokens`."""

    def __init__(self, folder: Path) -> None:
        import json

        index = Path(folder) / HESSIANS_INDEX
        try:
            doc = json.loads(index.read_text(encoding="utf-8"))
            self.tokens, self.files = int(doc["tokens"]), dict(doc["tensors"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StageError(f"{index}: no input covariances ({exc}); rerun the imatrix stage with "
                             "imatrix.covariance: true") from None
        self.folder = Path(folder)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __getitem__(self, name: str) -> Any:
        import torch
        from safetensors import safe_open

        with safe_open(str(self.folder / self.files[name]), "pt") as f:
            return f.get_tensor(name).to(torch.float64)


def tensor_array(path: Path, name: str) -> np.ndarray:
    """A GGUF tensor as fp32 (rows × cols), dequantized by gguf-py from its bytes (the header read by
    gguf_files: gguf-py's reader parses the whole vocabulary first, seconds a file)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    from alpaca_lora_cpu.gguf_files import check_gguf

    t = next((t for t in check_gguf(path).tensors if t.name == name), None)
    if t is None:
        raise StageError(f"{path}: no tensor {name}")
    rows = t.n_elements // t.shape[0]
    data = np.fromfile(path, np.uint8, count=t.n_bytes, offset=t.data_offset).reshape(rows, -1)
    return gguf_dequantize(data, GGMLQuantizationType[t.type]).reshape(rows, t.shape[0]).astype(np.float32)


def write(level_file: Path, blocks: dict[str, bytes], out: Path) -> None:
    """`level_file` copied to `out` with each named tensor's bytes replaced by `blocks[name]` (the same length);
    `out` appears only whole (files.atomic_path)."""
    from alpaca_lora_cpu.files import atomic_path
    from alpaca_lora_cpu.gguf_files import check_gguf

    infos = {t.name: t for t in check_gguf(level_file).tensors}
    with atomic_path(out) as tmp:
        shutil.copyfile(level_file, tmp)
        with open(tmp, "r+b") as fh:
            for name, data in blocks.items():
                t = infos[name]
                if len(data) != t.n_bytes:
                    raise StageError(f"{name}: {len(data)} bytes of {t.type} blocks, llama.cpp's tensor has "
                                     f"{t.n_bytes}")
                fh.seek(t.data_offset)
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def rounded_by(only: Callable[[str], bool] | None, head: bool) -> Callable[[str], bool] | None:
    """`only` (a recipe's -gptq tensors, or None: all) less the output matrix unless `head` (quantize.gptq.head)."""
    if head:
        return only
    return lambda name: name not in HEAD_NAMES and (only is None or only(name))


def gptq_tensors(level_file: Path, hessians: Any, only: Callable[[str], bool] | None = None) -> list[Any]:
    """The tensors of llama.cpp's file that GPTQ rounds: those stored in one of FORMATS with an input covariance
    (and, given `only`, whose name it accepts: a recipe's -gptq tensors)."""
    from alpaca_lora_cpu.gguf_files import check_gguf

    types = {f.ggml_type for f in FORMATS.values()}
    return [t for t in check_gguf(level_file).tensors
            if t.type in types and shared_name(t.name) in hessians and (only is None or only(t.name))]


def digest(array: Any, head: str = "") -> str:
    """SHA-256 of `head` and a tensor's bytes."""
    import hashlib

    h = hashlib.sha256(head.encode())
    h.update(array.numpy().tobytes())
    return h.hexdigest()


class RoundedBlocks:
    """A folder of GPTQ's packed blocks, one file per tensor, each under the SHA-256 of all it is a function of:
    the format, damp, act_order, the reference weights and the input covariance. A changed input is therefore a
    miss (the tensor is rounded again), never a stale hit. `writable`: `put` stores, `save` writes the index."""

    def __init__(self, folder: Path, writable: bool = False) -> None:
        import json

        self.folder, self.writable = Path(folder), writable
        index = self.folder / BLOCKS_INDEX
        try:
            self.entries = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}
        except ValueError as exc:
            raise StageError(f"{index}: not a GPTQ block index ({exc}); rerun the search stage") from None

    @staticmethod
    def key(fmt: BlockFormat, damp: float, act_order: bool, weight: Any, hessian_digest: str) -> str:
        """The key of `weight` rounded in `fmt` over the covariance whose `digest` is given."""
        head = f"{fmt.ggml_type}|{damp!r}|{act_order}|{tuple(weight.shape)}|{hessian_digest}|"
        return digest(weight, head)

    def get(self, key: str, n_bytes: int) -> tuple[bytes, float] | None:
        """(blocks, GPTQ's proxy error) kept under `key`, None if absent (or not `n_bytes` long: another layout)."""
        entry = self.entries.get(key)
        path = self.folder / f"{key}.bin"
        if entry is None or entry["bytes"] != n_bytes or not path.is_file():
            return None
        data = path.read_bytes()
        if len(data) != n_bytes:
            raise StageError(f"{path}: {len(data)} bytes, its index says {n_bytes}; rerun the search stage")
        return data, float(entry["gptq_error"])

    def put(self, key: str, name: str, data: bytes, error: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{key}.bin").write_bytes(data)
        self.entries[key] = {"tensor": name, "bytes": len(data), "gptq_error": error}

    def save(self) -> None:
        from alpaca_lora_cpu.files import write_json

        write_json(self.folder / BLOCKS_INDEX, self.entries)


def make(level_file: Path, reference: Path, hessians: dict[str, Any], damp: float, out: Path,
         compare: Path | None = None, progress: Callable[[str], None] | None = None, joint_refit: bool = False,
         act_order: bool = False, only: Callable[[str], bool] | None = None,
         store: RoundedBlocks | None = None) -> dict:
    """The GPTQ file at `out`: every tensor that llama.cpp's `level_file` (a level's or a recipe's) stores in one
    of FORMATS and that has an input covariance, rounded by GPTQ in its own format from the reference GGUF's
    weights; the rest kept. Details: per tensor, the proxy error of GPTQ, of llama.cpp's rounding in
    `level_file`, and of `compare` (e.g. the imatrix file). `only`: round just the tensors whose name it accepts.
    `store`: take a tensor's blocks from it when kept there under the same inputs, and (writable) keep the rest."""
    import torch

    by_type = {f.ggml_type: f for f in FORMATS.values()}
    blocks, per_tensor, types, h_digests = {}, {}, {}, {}
    reused = 0
    for t in gptq_tensors(level_file, hessians, only):
        fmt = by_type[t.type]
        types[t.type] = types.get(t.type, 0) + 1
        w = torch.from_numpy(tensor_array(reference, t.name))
        h = hessians[shared_name(t.name)]
        key = None
        if store is not None and not joint_refit:  # the joint refit is a bench-only variant: never kept
            if shared_name(t.name) not in h_digests:  # q / k / v share one H: hash it once
                h_digests[shared_name(t.name)] = digest(h)
            key = RoundedBlocks.key(fmt, damp, act_order, w, h_digests[shared_name(t.name)])
        kept = store.get(key, t.n_bytes) if key else None
        if kept:
            blocks[t.name], gptq_error = kept
            reused += 1
        else:
            scales, q = gptq(w, h, fmt, damp, act_order=act_order)
            if joint_refit:
                scales = refit(w, h, scales, q, fmt)
            blocks[t.name] = pack(scales, q, fmt)
            gptq_error = float(proxy_error(w, dequantize(scales, q, fmt), h).sum())
            if key and store.writable:
                store.put(key, t.name, blocks[t.name], gptq_error)
        errs = {"gptq": gptq_error,
                "llama_cpp": float(proxy_error(w, torch.from_numpy(tensor_array(level_file, t.name)), h).sum())}
        if compare is not None:
            errs["compare"] = float(proxy_error(w, torch.from_numpy(tensor_array(compare, t.name)), h).sum())
        per_tensor[t.name] = errs
        if progress:
            progress(t.name)
    if not blocks:
        raise StageError(f"{level_file}: no {'/'.join(by_type)} tensor with an input covariance to round")
    write(level_file, blocks, out)
    return {"tensors": len(blocks), "types": types, "damp": damp, "joint_refit": joint_refit,
            "act_order": act_order, "reused": reused, "proxy_error": per_tensor}
