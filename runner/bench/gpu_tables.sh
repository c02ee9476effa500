#!/usr/bin/env bash
# GPU tables (well under 6 minutes on one H100/H200; run gpu_smoke.sh first): Phi-3-mini-shape decoding,
# the ~125M training step's MFU, FlexAttention vs SDPA on document masks. Sections run in this order and
# can be picked: `bash runner/bench/gpu_tables.sh decode train kernels` (no argument: all three).
#   GPU_TINY=1 bash runner/bench/gpu_tables.sh     # the same runs at tiny sizes on this machine
# Results: $OUT/<run>/results.json, $OUT/steps.tsv, $OUT/gpu_tables.log, $OUT/summary.md.
source "$(dirname "$0")/gpu_lib.sh"
SECTIONS=("$@")
setup

if [ "$TINY" = 1 ]; then
  DECODE_MODEL=(model=phi3 model.n_layers=2)
  DECODE_SIZES=(bench.warmup=0 bench.repeats=1 bench.new_tokens=4 "bench.cpu.batch_sizes=[1,2]"
                "bench.cpu.no_cache_batch_sizes=[]" "bench.cpu.prompt_lengths=[16]" bench.cpu.decode_prompt_length=16
                bench.cpu.reference_prompt_length=16)
  TRAIN_SIZE=(model.d_model=64 model.n_layers=2 model.n_heads=4 data.seq_len=64
              train.batch_size=4 train.max_steps=4 train.log_every=2)
  KERNEL_SIZES=(model.d_model=64 model.n_heads=4 tokenizer.vocab_size=512 data.seq_len=256 bench.warmup=0
                bench.repeats=1 "bench.cpu.kernel_seq_lens=[128,256]")
else
  # Phi-3-mini's shape (3.8B, random weights, bf16). One prompt length for the decode points and the reference, so
  # the reference's batch-1 compiled decoder is the decode point's (one compile per batch size, not two).
  DECODE_MODEL=(model=phi3_mini_shape model.dtype=bfloat16)
  DECODE_SIZES=(bench.warmup=1 bench.repeats=3 bench.new_tokens=64 "bench.gpu.batch_sizes=[1,32]"
                "bench.gpu.no_cache_batch_sizes=[]" "bench.gpu.prompt_lengths=[512]" bench.gpu.decode_prompt_length=128
                bench.gpu.reference_prompt_length=128 bench.reference_static=false)
  # ~125M GPT-2 (124M at vocab 50304) at seq 1024: the same model and vocabulary eager and compiled.
  TRAIN_SIZE=(model.d_model=768 model.n_layers=12 model.n_heads=12 model.vocab_size=50304 data.seq_len=1024
              train.batch_size=16 train.max_steps=60 train.log_every=10)
  KERNEL_SIZES=(model.d_model=1024 model.n_heads=16 tokenizer.vocab_size=32064 data.seq_len=8192 bench.warmup=1
                bench.repeats=5 "bench.gpu.kernel_seq_lens=[2048,4096,8192]")
fi

# Decode: batch 1 and 32, eager vs compiled, fraction of the bandwidth bound, against transformers' generate.
wants decode && step phi3_mini_decode 300 task=bench "${DECODE_MODEL[@]}" bench.compile=true bench.reference=true \
  bench.run.train=false bench.run.kernels=false "${DECODE_SIZES[@]}" train.device=$DEVICE
# Training: the loop's own steps (median logged window: the compile warm-up is left out), eager then compiled.
for c in false true; do
  wants train && step gpt2_124m_train_compile_$c 150 model=gpt2 "${TRAIN_SIZE[@]}" train.compile=$c \
    train.warmup_steps=5 train.eval_every=0 train.checkpoint_every=0 train.final_eval_batches=2 train.bench=false \
    train.device=$DEVICE
done
# Kernels: FlexAttention's document block mask vs SDPA's dense document mask vs SDPA causal, 2k-8k.
wants kernels && step attention_kernels 150 task=bench model=gqa_rope model.n_layers=1 "${KERNEL_SIZES[@]}" \
  bench.run.train=false bench.run.prefill=false bench.run.decode=false bench.reference=false \
  "bench.kernels.kernels=[sdpa,flex]" "bench.kernels.masks=[causal,documents]" train.device=$DEVICE
finish
