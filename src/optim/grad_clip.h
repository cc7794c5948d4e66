// Global gradient-norm clipping with torch.nn.utils.clip_grad_norm_'s semantics, split so that a parallel run
// can all-reduce the partial sums of squares before taking the square root.
#pragma once

#include <cstdint>

#include "optim/adamw.h"

namespace nextron {

// Sum of squares of g[0, range.size()) (g addresses flat element range.begin), accumulated in double over
// fixed-size blocks summed in a fixed order: the result does not depend on the thread count.
double grad_sq_sum(const float* g, FlatRange range);

// torch's clip coefficient min(1, max_norm / (total_norm + 1e-6)). max_norm must be > 0. A NaN norm gives NaN
// (as in torch, whose default error_if_nonfinite=False multiplies the gradients by it); callers that want to skip
// such a step check the norm first.
double clip_coefficient(double total_norm, double max_norm);

// g[i] *= s for g[0, range.size()) (g addresses flat element range.begin). Also the 1/num_micro_batches scale of
// gradient accumulation.
void scale_grads(float* g, FlatRange range, float s);

// Single-process clip_grad_norm_: returns the total L2 norm of g before clipping and scales g by
// clip_coefficient when it is below 1.
double clip_grad_norm(float* g, FlatRange range, double max_norm);

}  // namespace nextron
