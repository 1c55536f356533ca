#!/usr/bin/env bash
# Train the shapes test bed (`testbed.model`) on the lent GPU machine and send the
# checkpoint back as one archive. That machine has torch, transformers, tqdm and pillow, not vLLM:
# it trains; serving and `make accuracy` stay here. Through the device tool:
#
#   run(command="bash testbed/train_on_gpu.sh --lm-steps 20000",
#       carry=["models/shapes-llava.stage1"], timeout_s=540)
#   # then, here: tar -xzf FILES_AT/shapes-llava.tgz -C models
#
# Arguments go to `python -m testbed.model` (not DIR or --device). A carried stage-1
# cache (models/shapes-llava.stage1, written by a run here with the same stage-1 fields) is reused,
# so the GPU's minutes go to stage 2, the language model. DEVICE=cpu runs the script anywhere.
set -euo pipefail
: "${OUT:?OUT must name the folder that comes back (the device tool sets it)}"
work=$(mktemp -d)
if [ -d models/shapes-llava.stage1 ]; then
    cp -r models/shapes-llava.stage1 "$work/"
fi
PYTHONUNBUFFERED=1 python3 -m testbed.model "$work/shapes-llava" \
    --device "${DEVICE:-cuda}" "$@" 2>&1 | tee "$OUT/train.log"
cp "$work/shapes-llava/idselect_training.json" "$OUT/"
tar -C "$work" -czf "$OUT/shapes-llava.tgz" shapes-llava shapes-llava.stage1
ls -l "$OUT"
