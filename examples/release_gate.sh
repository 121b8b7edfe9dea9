#!/usr/bin/env bash
# Release gate: harden a model, audit the hardened model with a privacy threshold, and export it to
# ONNX only when the audit passes. The job fails (exit 4) when the hardened model still leaks.
#
# Usage: release_gate.sh MODEL PRIVATE_DATA PUBLIC_DATA OUT_DIR
#
#   MODEL         checkpoint or architecture spec to harden (e.g. models/resnet50.pt)
#   PRIVATE_DATA  ImageFolder the model was trained on (train/ and val/, or one folder per class)
#   PUBLIC_DATA   images the attacker may know, for the audit's image prior (ignored when PRIOR is set)
#   OUT_DIR       receives hardened.safetensors, audit/, model.onnx and the JSON documents
#
# Environment (all optional):
#   MISHIELD                  command to run, default `mishield`; e.g. "docker run --rm -v $PWD:/work mishield:cpu"
#   MISHIELD_MAX_ATTACK_ACC   gate: highest acceptable attack accuracy @1 as a fraction (default 0.5)
#   MISHIELD_HARDEN_ARGS      extra `harden` flags, e.g. "--arch timm:resnet50 --num-classes 100 --bido"
#   MISHIELD_EXAMPLE_EPOCHS   fine-tuning epochs of `harden` (default 10)
#   MISHIELD_EVAL_EPOCHS      epochs of the evaluation model (default 20)
#   MISHIELD_PRIOR_EPOCHS     epochs of the image prior (default 25)
#   MISHIELD_EVAL_ARGS        extra `train-eval` flags, e.g. "--batch-size 32 --lr 0.003" for small data
#   MISHIELD_PRIOR_ARGS       extra `prior train` flags, e.g. "--resolution 32 --width 16" for small images
#   MISHIELD_AUDIT_ARGS       audit budget flags (default "--preset default"), e.g. "-S 8 -C 1 -I 1 -K 1 -A 1 --allow-weak-budget" for a smoke test
#   MISHIELD_INPUT_SIZE       input size of the evaluation model (default: the prior's resolution)
#   MISHIELD_ATTACKS          attacks of the audit (default: the audit's own, ppa and the gradient-free blackbox);
#                             naming lomma or transfer also distils a surrogate of the hardened model from
#                             PUBLIC_DATA; the gate reads the worst case (docs/audit.md)
#   MISHIELD_SURROGATE_ARGS   extra `surrogate train` flags, e.g. "--surrogate-arch timm:resnet18 --epochs 20"
#   EVAL_MODEL, PRIOR         reuse an existing evaluation model / prior instead of training one
#
# Exit codes are mishield's (docs/pipelines.md): 0 released, 2 usage, 3 bad input,
# 4 privacy gate failed, 5 ONNX parity failed, 6 an output could not be written (disk full,
# permissions), anything else an internal error.
set -euo pipefail

if [[ $# -ne 4 ]]; then
    sed -n '5,10p' "$0" >&2
    exit 2
fi
model=$1 private=$2 public=$3 out=$4
read -r -a mishield <<<"${MISHIELD:-mishield}"
read -r -a harden_args <<<"${MISHIELD_HARDEN_ARGS:-}"
read -r -a prior_args <<<"${MISHIELD_PRIOR_ARGS:-}"
read -r -a eval_args <<<"${MISHIELD_EVAL_ARGS:-}"
read -r -a audit_args <<<"${MISHIELD_AUDIT_ARGS:---preset default}"
read -r -a surrogate_args <<<"${MISHIELD_SURROGATE_ARGS:-}"
attacks=${MISHIELD_ATTACKS:-}
max_attack_acc=${MISHIELD_MAX_ATTACK_ACC:-0.5}
mkdir -p "$out"

step() { printf '== %s\n' "$*" >&2; }

# Each step writes its --json document to a file; stdout carries nothing else (see docs/pipelines.md).
prior=${PRIOR:-$out/prior.safetensors}
if [[ -z ${PRIOR:-} ]]; then
    step "training the image prior on public data"
    "${mishield[@]}" prior train --data "$public" --out "$prior" --epochs "${MISHIELD_PRIOR_EPOCHS:-25}" \
        "${prior_args[@]}" --overwrite --json >"$out/prior.json"
fi
# The evaluator judges reconstructions at the prior's resolution, so it is trained there.
eval_size=(--prior "$prior")
[[ -n ${MISHIELD_INPUT_SIZE:-} ]] && eval_size=(--input-size "$MISHIELD_INPUT_SIZE")
eval_model=${EVAL_MODEL:-$out/eval.safetensors}
if [[ -z ${EVAL_MODEL:-} ]]; then
    step "training the evaluation model"
    "${mishield[@]}" train-eval --data "$private" --out "$eval_model" --epochs "${MISHIELD_EVAL_EPOCHS:-20}" \
        "${eval_size[@]}" "${eval_args[@]}" --overwrite --json >"$out/train-eval.json"
fi

step "hardening $model"
"${mishield[@]}" harden "$model" "${harden_args[@]}" --method rolss --data "$private" \
    --epochs "${MISHIELD_EXAMPLE_EPOCHS:-10}" --out "$out/hardened.safetensors" --overwrite --json >"$out/harden.json"

surrogates=()
if [[ ,$attacks, == *,lomma,* || ,$attacks, == *,transfer,* ]]; then
    # The adaptive attacker imitates the released model from its outputs on public images.
    step "distilling a surrogate of the hardened model"
    "${mishield[@]}" surrogate train "$out/hardened.safetensors" --public "$public" --out "$out/surrogate.safetensors" \
        "${surrogate_args[@]}" --overwrite --json >"$out/surrogate.json"
    surrogates=(--surrogate "$out/surrogate.safetensors")
fi

attack_args=()
[[ -n $attacks ]] && attack_args=(--attack "$attacks")
step "auditing the hardened model with ${attacks:-the default attacks} (gate: attack accuracy @1 <= $max_attack_acc)"
# The gate's exit code is the decision, so catch it instead of letting `set -e` end the script.
status=0
"${mishield[@]}" audit "$out/hardened.safetensors" --data "$private" --prior "$prior" --eval-model "$eval_model" \
    "${attack_args[@]}" "${surrogates[@]}" "${audit_args[@]}" --max-attack-acc "$max_attack_acc" --out "$out/audit" --overwrite --json \
    >"$out/audit.json" || status=$?
case $status in
    0) ;;
    4)
        echo "release blocked: the audit could not show attack accuracy @1 <= $max_attack_acc (leaky or inconclusive); see $out/audit/report.html" >&2
        exit 4
        ;;
    *)
        echo "release blocked: the audit could not run (exit $status)" >&2
        exit "$status"
        ;;
esac

step "exporting to ONNX"
status=0
"${mishield[@]}" export "$out/hardened.safetensors" --out "$out/model.onnx" --overwrite --json >"$out/export.json" || status=$?
if [[ $status -eq 5 ]]; then
    echo "release blocked: onnxruntime's outputs differ from PyTorch's; the ONNX file was not written" >&2
fi
if [[ $status -ne 0 ]]; then
    exit "$status"
fi
echo "released: $out/model.onnx" >&2
