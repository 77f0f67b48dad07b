#!/bin/bash
# The README's main job with the extra models switched off, then the issue-14 acceptance.
cd /work/main
RUN=runs/fashion-cpu-v7
date
/usr/bin/time -f "main job wall %e s" .venv/bin/instanas run --output $RUN --variants.count 0 --baseline.widths "[1.0]" --baseline.min_net false --baseline.random_policy false --quiet
echo "run rc=$?"; date
rm -rf runs/export-v7-onnx runs/export-v7-ts /tmp/pngs-1000
/usr/bin/time -f "export onnx wall %e s" .venv/bin/instanas export $RUN -o runs/export-v7-onnx --validate --quiet; echo "export rc=$?"
/usr/bin/time -f "export ts wall %e s" .venv/bin/instanas export $RUN -o runs/export-v7-ts --format torchscript --validate --quiet; echo "export ts rc=$?"
.venv/bin/python bench/test_pngs.py write $RUN /tmp/pngs-1000 --count 1000
/usr/bin/time -f "predict onnx wall %e s" .venv/bin/instanas predict runs/export-v7-onnx /tmp/pngs-1000 -o /tmp/pred-onnx.csv --quiet; echo "predict rc=$?"
.venv/bin/python bench/test_pngs.py score /tmp/pngs-1000 /tmp/pred-onnx.csv --run $RUN
/usr/bin/time -f "predict eager wall %e s" .venv/bin/instanas predict $RUN /tmp/pngs-1000 -o /tmp/pred-eager.csv --quiet; echo "predict eager rc=$?"
.venv/bin/python bench/test_pngs.py score /tmp/pngs-1000 /tmp/pred-eager.csv --run $RUN
date
