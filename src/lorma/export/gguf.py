"""A LoRA export written as llama.cpp's LoRA GGUF file (``lorma export --format gguf``).

llama.cpp loads adapters as GGUF files (``llama-cli -m base.gguf --lora adapter.gguf``, Ollama's ``ADAPTER``). Its
own route is ``convert_lora_to_gguf.py`` on a peft LoRA adapter, a script of the llama.cpp source tree that is not on
PyPI. This module writes the same file from an :class:`~lorma.export.LoraExport` (already checked against llama.cpp's
rules, ``serving="llamacpp"``) with the ``gguf`` package, the library the converter writes with, so that a user with a
GGUF base model and no llama.cpp checkout can serve a LoRMA+ adapter. What the file holds, as the converter writes it
(``make serving-check`` compares the two, tensor by tensor and key by key):

- tensors ``<gguf name>.lora_a`` (peft's ``lora_A``, ``r x d_in``) and ``<gguf name>.lora_b`` (``lora_B``,
  ``d_out x r``), float32, one pair per adapted module in the order the adapter lists them, the GGUF name given by
  gguf's own tensor map for the architecture (``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q``);
- the rows of ``lora_b`` for ``q_proj`` / ``k_proj`` permuted as the converter permutes those base weights (llama.cpp
  applies rotary embeddings to interleaved pairs, transformers to halves; conversion/llama.py ``LlamaModel.permute``),
  so that the adapter's update lands on the rows of the converted base weight it was trained for;
- keys ``general.architecture``, ``general.type = "adapter"``, ``adapter.type = "lora"``, the general metadata gguf's
  ``Metadata`` derives from the adapter's directory name (as the converter derives it from the adapter directory it
  reads), ``adapter.lora.alpha`` (the export's ``lora_alpha = r``: llama.cpp scales each pair by alpha over its rank)
  and ``general.quantization_version``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .lora import LoraExport

#: the file ``lorma export --format gguf`` writes in OUT_DIR (beside ``lorma_export.json``)
GGUF_FILE = "adapter.gguf"
#: Hugging Face architectures -> gguf's architecture name: the dense Llama family llama.cpp's converter writes as
#: ``MODEL_ARCH.LLAMA`` (conversion/llama.py), the ones ``--serving llamacpp`` accepts
GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "LLaMAForCausalLM": "llama", "MistralForCausalLM": "llama"}


def check_gguf_available() -> None:
    """Refuse ``--format gguf`` in one line, before any work, when the ``gguf`` package is missing."""
    from .lora import ExportError

    if importlib.util.find_spec("gguf") is None:
        raise ExportError("--format gguf writes with the gguf package, which is not installed: pip install gguf "
                          "(or lorma[real])")


def rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The rows of a ``q_proj`` / ``k_proj`` output (``n_head`` heads) in the order llama.cpp's converter stores them.

    Within each head, transformers' rotary embedding pairs dimension ``i`` with ``i + head_dim / 2``, llama.cpp's with
    ``i + 1``: the converter interleaves the two halves of every head. Applied to ``lora_b``'s rows, it moves the
    update onto the rows of the converted base weight.
    """
    out = rows.shape[0]
    if out % (2 * n_head):
        raise ValueError(f"{out} rows do not split into {n_head} heads of pairs")
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_tensors(state_dict: Mapping[str, Any], hparams: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    """``[(gguf name, float32 array)]``: the ``lora_a`` / ``lora_b`` pair of every module of a ``--serving llamacpp``
    export's ``state_dict`` (peft key names), named by gguf's tensor map for the base model's ``hparams``."""
    import gguf

    from .lora import ExportError

    arch = GGUF_ARCHITECTURES.get((hparams.get("architectures") or [None])[0] or "")
    if arch is None:
        raise ExportError(f"--format gguf writes adapters of {', '.join(GGUF_ARCHITECTURES)} models, not "
                          f"{(hparams.get('architectures') or ['an unknown architecture'])[0]}")
    n_head = int(hparams["num_attention_heads"])
    n_kv_head = int(hparams.get("num_key_value_heads") or n_head)
    arch_id = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    names = gguf.get_tensor_name_map(arch_id, int(hparams["num_hidden_layers"]))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in state_dict.items():
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ExportError(f"--format gguf: {key} is not a lora_A / lora_B tensor")
        pairs.setdefault(module, {})[part[0]] = tensor.detach().to("cpu").float().numpy()
    tensors: list[tuple[str, np.ndarray]] = []
    for module, pair in pairs.items():
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None or set(pair) != {"A", "B"}:
            raise ExportError(f"--format gguf: {module} has no GGUF tensor for {arch} (or lacks lora_A / lora_B)")
        lora_b = pair["B"]
        if module.endswith("self_attn.q_proj"):
            lora_b = rope_permute(lora_b, n_head)
        elif module.endswith("self_attn.k_proj"):
            lora_b = rope_permute(lora_b, n_kv_head)
        base = name.removesuffix(".weight") + ".weight"
        tensors.append((base + ".lora_a", np.ascontiguousarray(pair["A"], dtype=np.float32)))
        tensors.append((base + ".lora_b", np.ascontiguousarray(lora_b, dtype=np.float32)))
    return tensors


def write_gguf(path: Path, tensors: list[tuple[str, np.ndarray]], alpha: float, name: str, arch: str = "llama") -> None:
    """Write a llama.cpp LoRA adapter file at ``path``: ``tensors`` and the converter's keys, in its order.

    ``name``: the directory name the general metadata is derived from (gguf's ``Metadata`` heuristics, as the
    converter applies them to the adapter directory it reads, which holds no model card or config.json).
    """
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=arch)
    for tensor_name, data in tensors:
        writer.add_tensor(tensor_name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    total, *_ = writer.get_total_parameter_count()
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    metadata = gguf.Metadata.apply_metadata_heuristic(gguf.Metadata(), {}, {}, Path(name), total)
    if metadata.name is None:
        metadata.name = name
    metadata.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_writer_for(exported: LoraExport, hparams: Mapping[str, Any], name: str) -> Any:
    """The function :meth:`LoraExport.save` calls to write the adapter as ``GGUF_FILE`` into its staging directory.

    The tensors are mapped (and refused, naming the module) here, before anything is written.
    """
    tensors = gguf_tensors(exported.state_dict, hparams)
    arch = GGUF_ARCHITECTURES[(hparams.get("architectures") or [""])[0]]

    def write(folder: Path) -> list[str]:
        write_gguf(folder / GGUF_FILE, tensors, float(exported.config.lora_alpha), name, arch)
        return [GGUF_FILE]

    return write
