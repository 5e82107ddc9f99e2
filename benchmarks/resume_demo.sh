#!/bin/bash
# Usage: benchmarks/resume_demo.sh [WORK_DIR]   (needs ../shared next to the repository)
# DeiT-Tiny (shared weights), PTQ4ViT W8A8: an uninterrupted run vs a run killed with SIGKILL mid-calibration and resumed.
set -u
cd "$(dirname "$0")/.."
S=../shared/data/imagenet-sample
COMMON="quantize deit_tiny_patch16_224 --method ptq4vit --checkpoint ../shared/models/deit_tiny_patch16_224.safetensors --calib-data $S/images --calib-list $S/splits/calib.txt --eval-data $S/images --eval-list $S/splits/eval.txt --num-eval 300 --quiet --threads 2"
D=${1:-/tmp/vitquant-resume-demo}; rm -rf $D; mkdir -p $D
vitquant $COMMON --work-dir $D/wa --save $D/sa --json $D/a.json
vitquant $COMMON --work-dir $D/wb --save $D/sb --json $D/b.json &
P=$!
while [ "$(ls $D/wb/unit*.pt 2>/dev/null | wc -l)" -lt 6 ]; do sleep 0.5; done
kill -9 $P; wait $P; echo "killed: exit $? with $(ls $D/wb/unit*.pt | wc -l) of 14 units saved; sb exists: $(test -e $D/sb && echo yes || echo no); b.json exists: $(test -e $D/b.json && echo yes || echo no)"
vitquant $COMMON --work-dir $D/wb --save $D/sb --json $D/b.json
python - "$D" <<'PY'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/{x}.json")) for x in "ab")
print("resumed units", a["work_dir"]["resumed_units"], b["work_dir"]["resumed_units"])
print("top-1", a["quant_top1"], b["quant_top1"], "agreement", a["top1_agreement"], b["top1_agreement"])
print("saved tensors sha256 equal:", a["saved"]["tensors_sha256"] == b["saved"]["tensors_sha256"], a["saved"]["tensors_sha256"][:16])
PY
