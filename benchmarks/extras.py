"""Sections of BENCHMARKS.md beyond timing tables: flop counts, QLoRMA memory, torch.compile graph breaks."""

from __future__ import annotations

from pathlib import Path

import torch


def step_macs(method: str, n: int, d_out: int, d_in: int, r: int = 8) -> dict[str, int]:
    """Multiply-adds of one training step of one adapted Linear, beyond the frozen base's forward and input grad.

    LoRA: ``A x`` and ``B (A x)``, each paid three times (forward, input grad, weight grad).
    plus (pre): the same with ``d_out`` on both sides of ``B A``; post: ``d_in``.
    pi: the cheaper of applying the dense ``d x d`` map on activations (``3 n d^2``) and folding it into the
    weight (``2 d^2 d_other`` for the fold and its backward, ``n d d_other`` for the folded weight's grad),
    plus building it (``3 d^2 r``).
    """
    if method == "lora":
        return {"adapter": 3 * n * r * (d_in + d_out)}
    side = method.split("-")[-1]
    d, other = (d_out, d_in) if side == "pre" else (d_in, d_out)
    if "plus" in method:
        return {"adapter": 3 * n * r * 2 * d}
    activation = 3 * n * d * d
    fold = 2 * d * d * other + n * d * other
    return {"adapter": min(activation, fold) + 3 * d * d * r}


def flop_section() -> str:
    """Why pi cannot match LoRA and where the reference orderings lose: counts at the benchmarked shapes."""
    shapes = [
        ("MiniLM query (16 x 128 tokens)", 2048, 384, 384),
        ("SmolLM2 q_proj (2 x 64 tokens)", 128, 576, 576),
        ("GPT-2 M c_attn q part (4 x 128 tokens)", 512, 1024, 1024),
        ("Linear 1024 (512 tokens)", 512, 1024, 1024),
        ("LLaMA-3-8B up_proj (2048 tokens)", 2048, 14336, 4096),
    ]
    lines = [
        "## Flop counts against the LoRA baseline",
        "",
        "Multiply-adds per training step of one adapted module beyond the frozen base's forward and input "
        "gradient (which every method pays: `2 n d_out d_in`), from `benchmarks/extras.py: step_macs`.",
        "",
        "| module | base (2 n d_out d_in) | LoRA | plus pre | plus post | pi pre | pi post | pi pre / base |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, n, d_out, d_in in shapes:
        base = 2 * n * d_out * d_in
        vals = [step_macs(m, n, d_out, d_in)["adapter"] for m in
                ("lora", "lorma-plus-pre", "lorma-plus-post", "lorma-pi-pre", "lorma-pi-post")]
        lines.append(f"| {name} | {base:.2e} | " + " | ".join(f"{v:.2e}" for v in vals)
                     + f" | {vals[3] / base:.2f} |")
    lines += [
        "",
        "- plus costs what LoRA costs (`6 n r d` either way): its step time can match LoRA's. On the pre side it "
        "must keep `W0 x` (n x d_out) for A's gradient, one activation per adapted module that LoRA does not "
        "keep (LoRA keeps x, which exists anyway): that is its memory overhead at layer level.",
        "- pi(BA) is full rank, so any exact application costs `~ d^2` per token or `d^2 d_other` per step: at "
        "d = d_in = d_out it adds from 0.5x to 1.5x of the adapted module's base cost. Whole-model ratios are "
        "lower because only q and v are adapted. The FFT form (`lorma.functional.apply_pi_fft`, "
        "`O(n r d log d)`) needs fewer flops at large d but ran 1.06x to 2.3x slower than the dense form on "
        "this CPU at d = 384..4096 (2048 tokens, forward + backward; `benchmarks/fft_vs_dense.md`, written by "
        "`python -m benchmarks.fft_vs_dense`), so it is used only to bound memory: "
        "above `LormaConfig.max_dense_bytes` (default 256 MiB, d > 8192; LLaMA-3-8B up/gate on the pre side, "
        "d = 14336) pi runs through it in token chunks under activation checkpointing, at most "
        "`LormaConfig.fft_chunk_bytes` (default 64 MiB) of working memory per module, and no d x d matrix is built.",
        "- Against the reference orderings: plus saves Table 11's second `W0 x` (a whole base matmul, forward "
        "and backward) and the released code's weight-gradient GEMM (`n d_out d_in`) and weight copy. For pi, "
        "lorma picks the cheaper of the two dense orderings per shape, and each reference ordering is one of "
        "them (Table 11 = activations, released = fold): at a shape where lorma picks the same ordering as a "
        "reference, the gain over that reference is only the gather index and its d x d int64 memory, so the "
        "1.3x goal for pi can only be met against the reference whose ordering is the costlier one there.",
    ]
    return "\n".join(lines)


def compile_section() -> str:
    """Graph breaks of a LoRMA model under torch.compile (``torch._dynamo.explain``), plus and pi."""
    import peft
    from transformers import BertConfig, BertModel

    import lorma

    lines = ["## torch.compile", "",
             "`torch._dynamo.explain` on a 2-layer BERT (hidden 32) with LoRMA on query and value, training "
             "mode; `tests/core/test_compile.py` checks that compiled outputs and gradients equal eager ones.", "",
             "| config | graphs | graph breaks | break reasons |", "|---|---:|---:|---|"]
    for inflation in ("plus", "pi"):
        for side in ("pre", "post"):
            torch.manual_seed(0)
            base = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=48, vocab_size=120))
            model = peft.get_peft_model(base, lorma.LormaConfig(r=4, inflation=inflation, side=side,
                                                                target_modules=["query", "value"]))
            ids = torch.randint(0, 120, (2, 16))
            torch._dynamo.reset()
            explanation = torch._dynamo.explain(model)(input_ids=ids)
            reasons = sorted({str(b.reason).splitlines()[0][:80] for b in explanation.break_reasons})
            lines.append(f"| {inflation}, {side} | {explanation.graph_count} | {explanation.graph_break_count} "
                         f"| {'; '.join(reasons) or '-'} |")
    torch._dynamo.reset()
    return "\n".join(lines)


def qlorma_memory_section(cache_root: Path) -> str:
    """Markdown: memory of SmolLM2-135M fp32 against nf4 and int8 bases, each with a LoRMA adapter."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorma import LormaConfig
    from lorma.layers.bnb import module_bytes

    from .harness import smollm2_plain_dir

    folder = smollm2_plain_dir(cache_root)
    rows = []
    configs = {
        "fp32": None,
        "nf4 (4-bit)": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32),
        "int8 (8-bit)": BitsAndBytesConfig(load_in_8bit=True),
    }
    fp32_bytes = None
    for name, qcfg in configs.items():
        kwargs = {"quantization_config": qcfg} if qcfg is not None else {}
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs)
        base_bytes = module_bytes(model)
        cfg = LormaConfig(r=8, alpha=16, inflation="plus", target_modules=["q_proj", "v_proj"])
        model = peft.get_peft_model(model, cfg)
        adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        total = base_bytes + adapter
        fp32_bytes = fp32_bytes or total
        rows.append(f"| {name} | {base_bytes / 2**20:.1f} MiB | {adapter / 2**20:.2f} MiB | "
                    f"{total / 2**20:.1f} MiB | {total / fp32_bytes:.3f} |")
        del model
    return "\n".join([
        "## QLoRMA memory (SmolLM2-135M, LoRMA+ r = 8 on q_proj, v_proj)",
        "",
        "Weights and buffers as stored (packed 4-bit weights plus their quantization state; the tied "
        "embedding / lm_head and the norms stay fp32, as bitsandbytes leaves them), plus the fp32 adapter. "
        "`tests/core/test_quantized.py` checks on this model that the quantized forward matches LoRMA applied to "
        "the dequantized base, that training steps change only the adapter, and merging both ways.",
        "",
        "| base | base weights | adapter | total | / fp32 |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ])
