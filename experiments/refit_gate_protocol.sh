#!/usr/bin/env bash
# The `pneumoscan calibrate --refit_gate` protocol of docs/experiments.md ("Loosening the
# feature-distance gate for a site"): calibrate on site A with and without --refit_gate, then with
# each checkpoint count the refusals of site B's valid films and of dev_shift's and the generated
# out-of-scope sets through the whole pipeline, and the distance stage alone.
#
#   cd experiments && PYTHONPATH=. python inuse_folders.py --data_dir ../../shared/data/chest_xray --out /tmp/inuse
#   PYTHONPATH=. python ood_corpus.py --out /tmp/ood
#   bash refit_gate_protocol.sh /tmp/inuse /tmp/ood ../../shared/data/dev_shift OUT_DIR [MODEL]
set -euo pipefail
inuse=$1 ood=$2 dev=$3 out=$4 model=${5:-}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
model_arg=()
[[ -n $model ]] && model_arg=(--model_path "$model")
base=$model
[[ -z $base ]] && base=$(python -c "from pneumoscan.checkpoint import default_model_path; print(default_model_path())")

pneumoscan calibrate "${model_arg[@]}" --data_dir "$inuse/siteA" --site siteA --output_path "$out/siteA.pth" \
    --json "$out/siteA.json" --n_boot 200 > "$out/calibrate_siteA.log" 2>&1
pneumoscan calibrate "${model_arg[@]}" --data_dir "$inuse/siteA" --site siteA --refit_gate \
    --output_path "$out/siteA_gate.pth" --json "$out/siteA_gate.json" --n_boot 200 > "$out/calibrate_siteA_gate.log" 2>&1
for ck in siteA siteA_gate; do
    pneumoscan evaluate --model_path "$out/$ck.pth" --data_dir "$inuse/siteB" --backend torch --n_boot 200 \
        --output_path "$out/siteB_$ck.json" > "$out/siteB_$ck.log" 2>&1
    for d in other_radiographs lateral_chest adult_frontal; do
        pneumoscan evaluate --model_path "$out/$ck.pth" --data_dir "$dev/$d" --scope_report --backend torch \
            --output_path "$out/${d}_$ck.json" > "$out/${d}_$ck.log" 2>&1
    done
    pneumoscan evaluate --model_path "$out/$ck.pth" --data_dir "$ood" --scope_report --backend torch \
        --output_path "$out/ood_$ck.json" > "$out/ood_$ck.log" 2>&1
done
PYTHONPATH="$here" python "$here/gate_alone.py" --model_path "$base" --model_path "$out/siteA_gate.pth" \
    --dev_shift "$dev" --ood_dir "$ood" --json "$out/gate_alone.json" > "$out/gate_alone.log" 2>&1
echo "protocol done: $out"
