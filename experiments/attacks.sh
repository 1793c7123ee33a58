#!/usr/bin/env bash
# Black-box attacks on the v2 comparison models (run those comparisons first: the checkpoints are
# experiments/results/<comparison>/runs/...): plain SGD against the models trained on the loss
# smoothed in relative-noise units at eta_train 0.1 (noise injection and zeroth-order low-rank),
# seed 0, the first 100 test images, every optimizer, 10,000 queries per image: untargeted L∞, then
# targeted L∞ (a random other class per image) and untargeted L2.
# bash experiments/attacks.sh   (results: experiments/results/attack_<model>{,_targeted,_l2}/)
set -euo pipefail
run() {  # run <comparison> <out> <eps> [more attack options]
  local runs="experiments/results/$1/runs"
  robusttrain attack --eps "$3" "${@:4}" --images 100 --max-queries 10000 --out "experiments/results/$2" \
    --ckpt "$runs/sgd_momentum/seed0/checkpoints/last.ckpt" --name sgd \
    --ckpt "$runs/noise_injection/level0.1/seed0/checkpoints/last.ckpt" --name noise_injection_0.1 \
    --ckpt "$runs/zo_lowrank/level0.1/seed0/checkpoints/last.ckpt" --name zo_lowrank_0.1
}
run mnist_mlp_v2 attack_mnist_mlp 0.2
run fashion_mlp_v2 attack_fashion_mlp 0.1
run fashion_lenet_v2 attack_fashion_lenet 0.1
run mnist_mlp_v2 attack_mnist_mlp_targeted 0.2 --targeted
run fashion_mlp_v2 attack_fashion_mlp_targeted 0.1 --targeted
run fashion_lenet_v2 attack_fashion_lenet_targeted 0.1 --targeted
run mnist_mlp_v2 attack_mnist_mlp_l2 2 --threat l2
run fashion_mlp_v2 attack_fashion_mlp_l2 1 --threat l2
run fashion_lenet_v2 attack_fashion_lenet_l2 1 --threat l2
