"""Run by tests/core/test_distributed_sharded.py: train LoRMA adapters on a tiny Llama for a few steps, either in one
process on the whole batch or under ``torch.distributed.run`` with FSDP2 ``fully_shard`` (gloo, CPU), each rank
on its half of the batch; save each adapter as a peft adapter and the final logits.

Cases: ``plus`` (pre side) and ``pi`` (post side) with the decoder layers wrapped (the configs' auto-wrap), and
``pi-per-linear``: pre-side pi with every adapted ``nn.Linear`` wrapped on its own, so that the frozen weight is
sharded whenever LoRMA reads it outside the linear's forward (the pi weight fold), as under DeepSpeed ZeRO-3.
``zero3-plus`` / ``zero3-pi`` / ``zero3-none`` / ``zero3-pi-fft`` (pi's bounded FFT path): DeepSpeed ZeRO-3 on
its CPU accelerator (gloo), every parameter partitioned (persistence threshold 0), nothing marked: DeepSpeed
gathers ``A``, ``B`` and a base weight read outside its own module's forward as external parameters (see
:mod:`lorma.plumbing.sharding`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

CASES = {
    "plus": {"inflation": "plus", "side": "pre", "wrap": "decoder-layer"},
    "pi": {"inflation": "pi", "side": "post", "wrap": "decoder-layer"},
    "pi-per-linear": {"inflation": "pi", "side": "pre", "wrap": "linear"},
    "zero3-plus": {"inflation": "plus", "side": "post", "wrap": "zero3"},
    "zero3-pi": {"inflation": "pi", "side": "pre", "wrap": "zero3"},
    "zero3-none": {"inflation": "none", "side": "post", "wrap": "zero3"},
    # max_dense_bytes below one 16 x 16 transform: pi takes its bounded FFT path on every module
    "zero3-pi-fft": {"inflation": "pi", "side": "pre", "wrap": "zero3", "max_dense_bytes": 512},
}
FSDP_CASES = [c for c, spec in CASES.items() if spec["wrap"] != "zero3"]
ZERO3_CASES = [c for c, spec in CASES.items() if spec["wrap"] == "zero3"]
TARGETS = ["q_proj", "v_proj", "down_proj"]
STEPS = 3
BATCH, LENGTH = 4, 24


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def batch() -> torch.Tensor:
    return torch.randint(0, 128, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))


def probe() -> torch.Tensor:
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))


def run_case(case: str, out: Path, rank: int, world: int) -> None:
    from peft import get_peft_model

    import lorma  # noqa: F401  (registers LoRMA with peft)
    from lorma import LormaConfig
    from lorma.plumbing.sharding import trainable_state_dict

    spec = CASES[case]
    torch.manual_seed(0)
    bounds = {"max_dense_bytes": spec["max_dense_bytes"]} if "max_dense_bytes" in spec else {}
    config = LormaConfig(r=4, alpha=8, inflation=spec["inflation"], side=spec["side"], target_modules=TARGETS,
                         **bounds)
    model = get_peft_model(tiny_llama(), config)
    torch.manual_seed(0)
    ids = batch()
    rows = ids.shape[0] // world
    ids = ids[rank * rows : (rank + 1) * rows]  # each rank trains on its part of the same batch
    engine = None
    if world > 1 and spec["wrap"] == "zero3":
        import deepspeed

        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
            "train_micro_batch_size_per_gpu": rows, "gradient_accumulation_steps": 1, "train_batch_size": BATCH,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
        partitioned = [n for n, p in model.named_parameters() if p.data.numel() == 0]
        assert any("base_layer" in n for n in partitioned), "ZeRO-3 left the frozen weights whole"
    elif world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.model.layers:
            if spec["wrap"] == "linear":
                for name, module in layer.named_modules():
                    if name.endswith(tuple(TARGETS)) and hasattr(module, "base_layer"):
                        fully_shard(module.base_layer, mesh=mesh)
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        sharded = [n for n, p in model.named_parameters() if type(p).__name__ == "DTensor"]
        assert sharded, "fully_shard left no parameter sharded"
    if engine is None:  # after fully_shard, which replaces the parameters by sharded ones
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(STEPS):
        if engine is not None:
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        else:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        losses.append(float(loss.detach()))
    tensors = trainable_state_dict(model)  # collective: every rank gathers the whole adapter
    assert tensors and all(t.shape.numel() > 0 for t in tensors.values())
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe()).logits
    if rank == 0:
        folder = out / case
        model.save_pretrained(str(folder), state_dict=tensors, safe_serialization=True)
        torch.save({"logits": logits.detach().cpu(), "losses": losses}, folder / "result.pt")
    digest = [float(t.double().sum()) for t in tensors.values()]
    print(json.dumps({"rank": rank, "case": case, "digest": digest}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--cases", default=",".join(FSDP_CASES))
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    try:
        for case in args.cases.split(","):
            run_case(case, Path(args.out), rank, world)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
