// sppo_loss.cu: the preference losses of one (micro-)batch and their gradients w.r.t. the policy's
// summed response log-probs, fused in one kernel. Semantics are those of the f64 CPU reference,
// src/train/loss.rs (`pair_loss`, `single_loss`) as the trainer applies them
// (src/train/trainer.rs `example_loss` and its per-step sums); formulas in ../shared/SPPO.md:
//
//   a = policy_w - ref_w, b = policy_l - ref_l (summed log-probs), eta = 1 / beta
//   kind 0 sppo         loss = 1/2[(a - eta(P_win - 1/2))^2 + (b - eta(P_lose - 1/2))^2]
//   kind 1 sppo_single  loss = 1/2[(a - eta(P_wl - 1/2))^2 + (b + eta(P_wl - 1/2))^2]
//   kind 2 sppo_hard    loss = (a - eta/2)^2 + (b + eta/2)^2
//   kind 3 dpo          loss = softplus(-beta(a - b)), overflow-free (as neg_log_sigmoid)
//   kind 4 ipo          loss = ((a - b) - 1/(2 beta))^2
//   kind 5 sppo, `--train-on all`: each of the example's K responses alone,
//                       loss = sum_k 1/2 (r_k - eta(P_k - 1/2))^2, r_k = policy_k - ref_k
//   gradients: d loss / d policy (= d loss / d a, since a = policy - reference), per sequence.
//
// Shapes (E examples, S sequences): seq_start (E + 1) int, example e owns sequences
// seq_start[e] .. seq_start[e + 1] (2 for kinds 0-4: chosen then rejected; K >= 1 for kind 5);
// policy, reference (S) f32 summed log-probs; probs f32: kinds 0-4 (E, 3) = P_wl (chosen_probs),
// P_win (chosen_probs_win), P_lose (chosen_probs_lose); kind 5 (S) = each response's win-rate.
// Outputs: example_loss (E) f32, the example's loss (not divided); dpolicy (S) f32, OVERWRITTEN
// with d loss / d policy / denominator (the `dseq` the model's backward takes: the gradient of
// the step's mean when denominator is the number of examples in the whole optimizer step);
// totals (3) f64 = sum_e loss_e / denominator, sum_e a_e / denominator, sum_e b_e / denominator,
// where for kind 5 a_e and b_e are the log-ratios of the example's best and worst response by
// win-rate (the last maximum, the first minimum, as Rust's max_by / min_by).
//
// All arithmetic is f64, as the reference's: at SPPO's beta = 1e-3 (eta = 1000) losses near 1e5
// and per-sequence gradients near 1e3 are normal, and a - eta(P - 1/2) cancels; inputs are f32
// (what the log-prob kernels produce) widened exactly, outputs are rounded once.
//
// Kernel (launcher: src/backend/cuda/ops/sppo_loss.rs):
//   sppo_loss_fwdbwd_f32   ONE block of kThreads (256) threads: thread t handles examples
//                          t, t + 256, ...; the three totals are summed per thread in example
//                          order, then by a fixed shared-memory tree: bitwise deterministic, no
//                          atomics. A batch is at most a few thousand examples, so one block is
//                          enough (a second kernel for partials would cost more than it saves).
//
// Preconditions (checked by the launcher, which also rejects probabilities outside [0, 1] for
// the kinds that read them and beta that is not finite and > 0): grid (1, 1, 1), block
// (256, 1, 1); E >= 1; seq_start ascending from 0 to S with the per-kind counts above;
// denominator >= E. No alignment requirement; no warp shuffles (tree through shared memory).
// Non-finite log-probs propagate into the outputs, as on the CPU (the trainer checks the loss).
//
// Failed ideas: none yet (no GPU measurements so far).

#include "common.cuh"

namespace sppo_loss {

constexpr int kThreads = 256;  // power of two: the tree halves it
constexpr int kSppo = 0, kSppoSingle = 1, kSppoHard = 2, kDpo = 3, kIpo = 4, kSppoAll = 5;

// -log sigmoid(z) = softplus(-z) and its derivative -sigmoid(-z), from the side where exp cannot
// overflow (src/train/loss.rs neg_log_sigmoid, line for line).
__device__ __forceinline__ void neg_log_sigmoid(double z, double* value, double* dz) {
    const double x = -z;
    *value = fmax(x, 0.0) + log1p(exp(-fabs(x)));
    const double sig_x = x >= 0.0 ? 1.0 / (1.0 + exp(-x)) : exp(x) / (1.0 + exp(x));
    *dz = -sig_x;
}

}  // namespace sppo_loss

extern "C" __global__ void sppo_loss_fwdbwd_f32(float* example_loss, float* dpolicy, double* totals,
                                                const float* policy, const float* reference, const float* probs,
                                                const int* seq_start, int n_examples, int kind, double beta,
                                                double denominator) {
    using namespace sppo_loss;
    __shared__ double red[3][kThreads];
    const int t = threadIdx.x;
    const double eta = 1.0 / beta;
    double sum_loss = 0.0, sum_chosen = 0.0, sum_rejected = 0.0;
    for (int e = t; e < n_examples; e += blockDim.x) {
        const int lo = seq_start[e], hi = seq_start[e + 1];
        double loss, chosen_lr, rejected_lr;
        if (kind == kSppoAll) {
            loss = 0.0;
            int best = lo, worst = lo;
            for (int s = lo; s < hi; s++) {
                const double w = (double)probs[s];
                const double r = ((double)policy[s] - (double)reference[s]) - eta * (w - 0.5);
                loss += 0.5 * r * r;
                dpolicy[s] = (float)(r / denominator);
                if (w >= (double)probs[best]) best = s;    // last maximum (max_by)
                if (w < (double)probs[worst]) worst = s;   // first minimum (min_by)
            }
            chosen_lr = (double)policy[best] - (double)reference[best];
            rejected_lr = (double)policy[worst] - (double)reference[worst];
        } else {
            const double a = (double)policy[lo] - (double)reference[lo];
            const double b = (double)policy[lo + 1] - (double)reference[lo + 1];
            const float* p = probs + 3 * (size_t)e;  // P_wl, P_win, P_lose
            double da, db;
            if (kind == kSppo) {
                const double rw = a - eta * ((double)p[1] - 0.5);
                const double rl = b - eta * ((double)p[2] - 0.5);
                loss = 0.5 * (rw * rw + rl * rl);
                da = rw;
                db = rl;
            } else if (kind == kSppoSingle) {
                const double target = eta * ((double)p[0] - 0.5);
                const double rw = a - target, rl = b + target;
                loss = 0.5 * (rw * rw + rl * rl);
                da = rw;
                db = rl;
            } else if (kind == kSppoHard) {
                const double rw = a - 0.5 * eta, rl = b + 0.5 * eta;
                loss = rw * rw + rl * rl;
                da = 2.0 * rw;
                db = 2.0 * rl;
            } else if (kind == kDpo) {
                double value, dz;
                neg_log_sigmoid(beta * (a - b), &value, &dz);
                loss = value;
                da = beta * dz;
                db = -beta * dz;
            } else if (kind == kIpo) {
                const double r = (a - b) - 1.0 / (2.0 * beta);
                loss = r * r;
                da = 2.0 * r;
                db = -2.0 * r;
            } else {  // an unknown kind (the launcher prevents it) must not pass silently
                loss = da = db = NAN;
            }
            dpolicy[lo] = (float)(da / denominator);
            dpolicy[lo + 1] = (float)(db / denominator);
            chosen_lr = a;
            rejected_lr = b;
        }
        example_loss[e] = (float)loss;
        sum_loss += loss / denominator;
        sum_chosen += chosen_lr / denominator;
        sum_rejected += rejected_lr / denominator;
    }
    red[0][t] = sum_loss;
    red[1][t] = sum_chosen;
    red[2][t] = sum_rejected;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (t < stride) {
            for (int k = 0; k < 3; k++) red[k][t] += red[k][t + stride];
        }
        __syncthreads();
    }
    if (t == 0) {
        for (int k = 0; k < 3; k++) totals[k] = red[k][0];
    }
}
