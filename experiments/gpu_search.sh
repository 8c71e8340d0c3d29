#!/usr/bin/env bash
# One device-tool call: the model search on a lent GPU, then the best run's files packed into $OUT.
# Data travel in .gpu/data (git-ignored, named in carry); checkpoints come back split in 15 MB parts.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
timeout "${SEARCH_SECONDS:-470}" python3 experiments/model_search.py --data_dir .gpu/data/chest_xray \
    --out /tmp/search --grid gpu --minutes "${MINUTES:-1.15}" --epochs 60 --patience 10 --cache_dir /tmp/cache \
    2>&1 | tee "$OUT/search_console.log" | grep -E "Epoch|search|stopped|calibration|ERROR|Error|rror"
python3 - <<'PY'
import json, os, shutil, subprocess
rows = json.load(open("/tmp/search/search.json")) if os.path.exists("/tmp/search/search.json") else []
out = os.environ["OUT"]
shutil.copy("/tmp/search/search.md", out) if os.path.exists("/tmp/search/search.md") else None
if rows:
    best = max(rows, key=lambda r: r["val_auroc"]["value"])
    print("best:", best["name"], best["val_auroc"])
    subprocess.run(["split", "-b", "15M", "-d", f"/tmp/search/{best['name']}/medical_cnn_model.pth",
                    f"{out}/best_model.pth.part"], check=True)
subprocess.run("tar czf $OUT/runs.tgz --exclude='*.pth' -C /tmp search", shell=True, check=True)
PY
ls -la "$OUT"
