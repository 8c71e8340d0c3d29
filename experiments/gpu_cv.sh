#!/usr/bin/env bash
# One device-tool call (issue 7): patient-level 5-fold cross-validation of the 224 px recipes on a lent GPU,
# their out-of-fold reports, and the half-width 5-fold ensemble (float16) packed into $OUT.
#
#   mkdir -p .gpu/data && cp -r ../shared/data/chest_xray .gpu/data/     # 42 MB; dev_shift adults too:
#   mkdir -p .gpu/shared/data && cp -r ../shared/data/dev_shift .gpu/shared/data/
#   device run: bash experiments/gpu_cv.sh   (carry: .gpu; timeout 600)
#
# Budget: FOLD_MINUTES per fold and recipe (training only; each fold also validates and fits its gate).
# Default schedule: cosine over EPOCHS (on the CPU it was the decisive change, docs/experiments.md). It
# anneals over EPOCHS, so EPOCHS must fit in FOLD_MINUTES, or the time cap stops a fold before the
# learning rate is low (check "stopped" in cv_console.log: "reached --epochs" is what you want).
# EXTRA="--lr_schedule plateau" gives the shipped model's schedule.
# half_acq is packed twice: all 5 folds (1.5-2.0x v1's CPU cost, at the 2x limit) and folds 0-2 (about 1x;
# benchmarks/model_cost.py, docs/benchmarks.md). full_acq is packed as folds 0-1 (2 full-width members,
# about 2x): on the CPU the half-width 224 px folds scored adult AUROC 0.62 against 0.73-0.75 for full width
# (docs/experiments.md), so the full-width ensemble may be the one that passes the decision rule.
# RECIPES="full_asp full_acq" trains with random aspect changes too (the film-shape shortcut, docs/experiments.md);
# full_asp is packed like full_acq; for an aspect-robust ensemble every member must be full_asp (v2.1 averaged with
# an aspect-trained member kept 0.65x of v2.1's squeeze errors, twelfth session). RECIPES="full_eq full_acq": per-film histogram-equalised input
# (--intensity equalize, docs/experiments.md), packed like full_acq. Judge a candidate also with experiments/aspect_shortcut.py --model_path.
# Then on this machine: python experiments/kfold_eval.py on the returned runs, fit_scope.py, int8_calibrate.py.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_cv_out}
mkdir -p "$OUT"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
DATA=${DATA:-.gpu/data/chest_xray}
RECIPES=${RECIPES:-half_acq full_acq}
for recipe in $RECIPES; do
    timeout "${RECIPE_SECONDS:-250}" python3 experiments/kfold.py --data_dir "$DATA" --out /tmp/cv --recipe "$recipe" \
        --holdout --folds "${FOLDS:-5}" --epochs "${EPOCHS:-20}" --patience "${PATIENCE:-10}" --minutes "${FOLD_MINUTES:-0.75}" \
        --cache_dir /tmp/cache ${EXTRA:---lr_schedule cosine} 2>&1 | tee -a "$OUT/cv_console.log" | grep -E "fold|stopped|Epoch [0-9]+/.*(0|5)/|rror"
    ensemble=()
    [ "$recipe" = half_acq ] && ensemble=(--write_ensemble "$OUT/ensemble_$recipe.pth")
    python3 experiments/kfold_eval.py --data_dir "$DATA" --runs "/tmp/cv/$recipe" --json "$OUT/cv_$recipe.json" \
        --cache_dir /tmp/cache --adult_dir "${ADULT_DIR:-.gpu/shared/data/dev_shift}" "${ensemble[@]}" \
        2>&1 | tee -a "$OUT/cv_console.log" | grep -E "OOF|rror"
    [ "$recipe" = half_acq ] && python3 experiments/kfold_eval.py --data_dir "$DATA" --runs "/tmp/cv/$recipe" \
        --only_folds 0 1 2 --json "$OUT/cv_${recipe}_f012.json" --cache_dir /tmp/cache \
        --adult_dir "${ADULT_DIR:-.gpu/shared/data/dev_shift}" --write_ensemble "$OUT/ensemble_${recipe}_3.pth" \
        2>&1 | tee -a "$OUT/cv_console.log" | grep -E "OOF|rror"
    # full width: two members cost about 2x the shipped model (the limit) and weigh about 19 MB in float16
    case "$recipe" in full_acq|full_asp|full_eq) python3 experiments/kfold_eval.py --data_dir "$DATA" --runs "/tmp/cv/$recipe" \
        --only_folds 0 1 --json "$OUT/cv_${recipe}_f01.json" --cache_dir /tmp/cache \
        --adult_dir "${ADULT_DIR:-.gpu/shared/data/dev_shift}" --write_ensemble "$OUT/ensemble_${recipe}_2.pth" \
        2>&1 | tee -a "$OUT/cv_console.log" | grep -E "OOF|rror" ;;
    esac
done
tar czf "$OUT/cv_runs.tgz" --exclude='*.pth' -C /tmp cv
for f in "$OUT"/*.pth; do [ -e "$f" ] && split -b 15M -d "$f" "$f.part" && rm "$f"; done
ls -la "$OUT"
