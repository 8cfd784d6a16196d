"""Importance matrix (imatrix) of a Hugging Face LLaMA model, in llama.cpp's GGUF imatrix format.

What llama.cpp's quantizer weighs each weight column by: for every 2-D weight a matmul reads, the mean over
calibration tokens of the squared input activation of each input column. llama-imatrix collects it from ggml's
matmuls; here hooks on the decoder's nn.Linear inputs collect the same sums from the HF checkpoint (the weights the
GGUF was converted from) in a forward that loads one decoder layer at a time (alpaca_lora_cpu/layerwise.py), so
no llama.cpp binary is needed and memory stays at one layer plus the calibration tokens' hidden states.

File layout (llama.cpp tools/imatrix, read by llama-quantize --imatrix and common's imatrix loader):
  general.type = "imatrix"; imatrix.datasets (string array); imatrix.chunk_count, imatrix.chunk_size (u32)
  per weight `<gguf tensor name>.in_sum2`  F32 ne [ncols, 1]: Σ x² over the tokens
             `<gguf tensor name>.counts`   F32 ne [1, 1]:     the token count
The quantizer's value for a column is in_sum2 / counts.

`collect(..., covariance=sink)` also sums each input's whole covariance Σ x xᵀ in the same pass and hands it to
`sink` a layer at a time (the imatrix stage writes it for the -gptq levels, alpaca_lora_cpu/gptq.py); in_sum2 is
then its diagonal.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from alpaca_lora_cpu.errors import StageError

SUM2, COUNTS = ".in_sum2", ".counts"


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray]  # GGUF tensor name (blk.0.attn_q.weight) → Σ x² per input column (float64)
    counts: dict[str, int]       # → tokens seen
    datasets: list[str]
    chunk_count: int
    chunk_size: int

    def means(self) -> dict[str, np.ndarray]:
        """in_sum2 / counts as float32: what llama.cpp's quantizer takes."""
        return {n: (s / max(self.counts[n], 1)).astype(np.float32) for n, s in self.sums.items()}


def gguf_name(hf_module: str, n_layers: int) -> str:
    """model.layers.3.self_attn.q_proj → blk.3.attn_q.weight (llama.cpp's converter's own name map)."""
    import gguf

    name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers).get_name(hf_module + ".weight",
                                                                            try_suffixes=(".weight",))
    if name is None:
        raise StageError(f"no GGUF tensor name for the module {hf_module!r}")
    return name


def collect(config: Any, get: Callable[[str], Any], sequences: list[list[int]],
            progress: Callable[[int], None] | None = None, batch_tokens: int = 4096,
            covariance: Callable[[int, dict[str, Any]], None] | None = None
            ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Σ x² and token counts of the input of every nn.Linear inside the decoder layers, over `sequences`, from the
    checkpoint `get` reads (layerwise.forward). The LM head is left out, as llama-imatrix does without
    --process-output. With `covariance`, the same pass also sums each input's whole Σ x xᵀ (fp32 products a
    batch, summed in fp64; q/k/v and gate/up once, gptq.SHARED) and hands `covariance(layer, {name: H})` each
    layer's as soon as the layer is done, so only one layer's are ever held; Σ x² is then H's diagonal. Last,
    `covariance(num_hidden_layers, {head: H})`: the LM head's input covariance (the final norm's output), under
    the GGUF name of the output matrix (token_embd.weight when tied, gptq.head_name); it is not in the imatrix,
    as llama-imatrix leaves the head out."""
    from alpaca_lora_cpu.gptq import head_name, shared_name
    from alpaca_lora_cpu.layerwise import forward

    n_layers = config.num_hidden_layers
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    layer: dict[str, Any] = {}  # this layer's Σ x xᵀ, by shared name

    def record(module: str, x: Any) -> None:
        name = gguf_name(module, n_layers)
        x = x.detach().reshape(-1, x.shape[-1])
        counts[name] = counts.get(name, 0) + x.shape[0]
        if covariance is None:
            x = x.double()
            sums[name] = sums[name] + (x * x).sum(0) if name in sums else (x * x).sum(0)
        elif shared_name(name) == name:
            x = x.float()
            xx = (x.T @ x).double()
            layer[name] = layer[name] + xx if name in layer else xx

    def done(i: int) -> None:
        if covariance is not None:
            for name in (n for n in counts if n.startswith(f"blk.{i}.")):
                sums[name] = layer[shared_name(name)].diagonal().clone()
            covariance(i, dict(layer))
            layer.clear()
        if progress:
            progress(i)

    head: list[Any] = []

    def record_head(x: Any) -> None:
        x = x.detach().float()
        xx = (x.T @ x).double()
        head[:] = [head[0] + xx if head else xx]

    forward(config, get, sequences, on_input=record, logits=False, progress=done, batch_tokens=batch_tokens,
            on_head_input=record_head if covariance is not None else None)
    if covariance is not None:
        covariance(n_layers, {head_name(config): head[0]})
    return {n: s.numpy() for n, s in sums.items()}, counts


def write(path: str | os.PathLike, imatrix: Imatrix) -> None:
    """The GGUF imatrix file (call inside an atomic_path block)."""
    import gguf

    if not imatrix.datasets:
        raise StageError("an imatrix needs a dataset name (gguf-py drops an empty imatrix.datasets array)")
    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", list(imatrix.datasets))
    writer.add_uint32("imatrix.chunk_count", imatrix.chunk_count)
    writer.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
    for name in sorted(imatrix.sums):
        # numpy (1, ncols) is ggml ne [ncols, 1]: one matrix (no experts)
        writer.add_tensor(name + SUM2, imatrix.sums[name].astype(np.float32).reshape(1, -1))
        writer.add_tensor(name + COUNTS, np.array([[imatrix.counts[name]]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read(path: str | os.PathLike) -> Imatrix:
    """A GGUF imatrix file back, checked as llama.cpp's loader checks it."""
    from alpaca_lora_cpu.gguf_files import open_gguf

    reader = open_gguf(path, "imatrix", "rerun the imatrix stage")
    fields = reader.fields
    missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in fields]
    if fields.get("general.type") is None or fields["general.type"].contents() != "imatrix" or missing:
        raise StageError(f"{path}: not a llama.cpp imatrix (general.type / {', '.join(missing) or 'ok'})")
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    sums = {n.removesuffix(SUM2): v.reshape(-1).astype(np.float64) for n, v in tensors.items() if n.endswith(SUM2)}
    counts = {n.removesuffix(COUNTS): int(v.reshape(-1)[0]) for n, v in tensors.items() if n.endswith(COUNTS)}
    if set(sums) != set(counts) or not sums:
        raise StageError(f"{path}: in_sum2 and counts tensors do not pair up")
    return Imatrix(sums, counts, list(fields["imatrix.datasets"].contents()),
                   int(fields["imatrix.chunk_count"].contents()), int(fields["imatrix.chunk_size"].contents()))


def c_array(means: dict[str, np.ndarray]) -> tuple[Any, list]:
    """llama_model_quantize_params.imatrix: a NULL-name-terminated array of {name, data, size}; (array, the
    buffers it points into, which must outlive the quantize call)."""
    import ctypes

    import llama_cpp

    keep = []
    entries = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()
    for i, (name, values) in enumerate(sorted(means.items())):
        buf = np.ascontiguousarray(values, dtype=np.float32)
        keep += [buf, name.encode()]
        entries[i].name = keep[-1]
        entries[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = buf.size
    entries[len(means)].name = None
    return entries, keep

