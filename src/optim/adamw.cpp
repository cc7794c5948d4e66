#include "optim/adamw.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/ops.h"
#include "model/param_table.h"

namespace nextron {

namespace {

// Elements per OpenMP work item: large enough to amortise the decay-range lookup, small enough to balance.
constexpr int64_t kBlock = 1 << 14;

void check_decay_ranges(const std::vector<FlatRange>& decay) {
  for (size_t i = 0; i < decay.size(); ++i) {
    NEXTRON_CHECK(decay[i].begin >= 0 && decay[i].begin <= decay[i].end, "AdamW: decay range ", i, " [", decay[i].begin,
                  ", ", decay[i].end, ") is invalid; build the ranges with decay_ranges()");
    NEXTRON_CHECK(i == 0 || decay[i - 1].end <= decay[i].begin, "AdamW: decay ranges ", i - 1, " and ", i,
                  " overlap or are unsorted; build the ranges with decay_ranges()");
  }
}

// The per-step scalars, computed as torch computes them: in double (Python floats), then used as fp32 scalars
// by the fp32 tensor kernels.
struct StepScalars {
  float decay_mul;  // 1 - lr * wd
  float w1;         // lerp weight 1 - beta1
  bool w1_small;    // torch's lerp branch: |w| < 0.5
  float one_minus_w1;
  float beta2;
  float w2;        // 1 - beta2
  float bc2_sqrt;  // (1 - beta2^step) ** 0.5
  float eps;
  float neg_step_size;  // -(lr / (1 - beta1^step))
};

StepScalars step_scalars(const AdamWHyper& h, int64_t step) {
  StepScalars s;
  s.decay_mul = static_cast<float>(1.0 - h.lr * h.weight_decay);
  s.w1 = static_cast<float>(1.0 - h.beta1);
  s.w1_small = std::abs(s.w1) < 0.5f;
  s.one_minus_w1 = 1.0f - s.w1;
  s.beta2 = static_cast<float>(h.beta2);
  s.w2 = static_cast<float>(1.0 - h.beta2);
  const double t = static_cast<double>(step);
  const double bc1 = 1.0 - std::pow(h.beta1, t), bc2 = 1.0 - std::pow(h.beta2, t);
  s.bc2_sqrt = static_cast<float>(std::pow(bc2, 0.5));
  s.eps = static_cast<float>(h.eps);
  s.neg_step_size = static_cast<float>(-(h.lr / bc1));
  return s;
}

// Elements [b, e) of the local arrays (local index = flat index - flat0); decay applies when `decay` is true.
inline void adamw_span(float* p, const float* g, float* m, float* v, int64_t b, int64_t e, bool decay,
                       const StepScalars& s) {
  for (int64_t i = b; i < e; ++i) {
    float param = p[i];
    if (decay) param *= s.decay_mul;
    const float grad = g[i];
    float mi = m[i];
    mi = s.w1_small ? mi + s.w1 * (grad - mi) : grad - (grad - mi) * s.one_minus_w1;
    float vi = v[i] * s.beta2;
    vi = vi + s.w2 * grad * grad;
    const float denom = std::sqrt(vi) / s.bc2_sqrt + s.eps;
    p[i] = param + s.neg_step_size * mi / denom;
    m[i] = mi;
    v[i] = vi;
  }
}

}  // namespace

void validate(const AdamWHyper& h) {
  NEXTRON_CHECK(std::isfinite(h.lr) && h.lr >= 0, "AdamW: lr must be finite and >= 0, got ", h.lr);
  NEXTRON_CHECK(h.beta1 >= 0 && h.beta1 < 1, "AdamW: beta1 must be in [0, 1), got ", h.beta1);
  NEXTRON_CHECK(h.beta2 >= 0 && h.beta2 < 1, "AdamW: beta2 must be in [0, 1), got ", h.beta2);
  NEXTRON_CHECK(std::isfinite(h.eps) && h.eps > 0, "AdamW: eps must be finite and > 0, got ", h.eps);
  NEXTRON_CHECK(std::isfinite(h.weight_decay) && h.weight_decay >= 0,
                "AdamW: weight_decay must be finite and >= 0, got ", h.weight_decay);
}

std::vector<FlatRange> decay_ranges(const ParamTable& table, bool decay_all) {
  std::vector<FlatRange> out;
  if (decay_all) {
    if (table.total_numel() > 0) out.push_back({0, table.total_numel()});
    return out;
  }
  for (const ParamSpec& s : table.specs()) {
    if (!s.weight_decay || s.numel() == 0) continue;
    const FlatRange r{s.offset, s.offset + s.numel()};
    if (!out.empty() && out.back().end == r.begin) {
      out.back().end = r.end;
    } else {
      NEXTRON_ASSERT(out.empty() || out.back().end < r.begin);
      out.push_back(r);
    }
  }
  return out;
}

void adamw_step(float* params, const float* grads, float* exp_avg, float* exp_avg_sq, FlatRange range,
                const std::vector<FlatRange>& decay, const AdamWHyper& h, int64_t step) {
  validate(h);
  NEXTRON_CHECK(step >= 1, "AdamW: step is the 1-based number of this update, got ", step);
  NEXTRON_CHECK(range.begin >= 0 && range.begin <= range.end, "AdamW: invalid range [", range.begin, ", ", range.end,
                ")");
  check_decay_ranges(decay);
  const int64_t n = range.size();
  if (n == 0) return;
  NEXTRON_CHECK(params && grads && exp_avg && exp_avg_sq, "AdamW: null buffer for a non-empty range");
  const StepScalars s = step_scalars(h, step);
  const int64_t flat0 = range.begin;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    // Flat indices of this block.
    const int64_t fb = flat0 + blk * kBlock, fe = std::min(flat0 + n, fb + kBlock);
    // First decay range that ends after fb.
    auto it = std::upper_bound(decay.begin(), decay.end(), fb, [](int64_t x, const FlatRange& r) { return x < r.end; });
    int64_t pos = fb;
    while (pos < fe) {
      if (it == decay.end() || it->begin >= fe) {
        adamw_span(params, grads, exp_avg, exp_avg_sq, pos - flat0, fe - flat0, false, s);
        break;
      }
      if (pos < it->begin) {  // undecayed gap before the next decay range
        adamw_span(params, grads, exp_avg, exp_avg_sq, pos - flat0, it->begin - flat0, false, s);
        pos = it->begin;
      }
      const int64_t de = std::min(fe, it->end);
      adamw_span(params, grads, exp_avg, exp_avg_sq, pos - flat0, de - flat0, true, s);
      pos = de;
      ++it;
    }
  }
}

AdamW::AdamW(const ParamTable& table, FlatRange range, const AdamWHyper& h, Ops* ops)
    : hyper_(h), ops_(ops), range_(range), decay_(decay_ranges(table, h.decay_all)) {
  validate(h);
  NEXTRON_CHECK(range.begin >= 0 && range.begin <= range.end && range.end <= table.total_numel(), "AdamW: range [",
                range.begin, ", ", range.end, ") is outside the parameter table's [0, ", table.total_numel(), ")");
  if (ops_) {
    ops_->f32_zeroed(exp_avg_, {range.size()});
    ops_->f32_zeroed(exp_avg_sq_, {range.size()});
  } else {
    exp_avg_ = Tensor::zeros({range.size()});
    exp_avg_sq_ = Tensor::zeros({range.size()});
  }
}

void AdamW::step(Tensor& flat_params, const Tensor& flat_grads, double lr, Tensor* params_act) {
  if (!ops_) {
    step(flat_params.f32(), flat_grads.f32(), lr);
    return;
  }
  AdamWHyper h = hyper_;
  h.lr = lr;
  ops_->adamw_step(flat_params, flat_grads, exp_avg_, exp_avg_sq_, params_act, range_, decay_, h, steps_ + 1);
  ++steps_;
}

void AdamW::step(float* flat_params, const float* flat_grads, double lr) {
  AdamWHyper h = hyper_;
  h.lr = lr;
  NEXTRON_CHECK(exp_avg_.numel() == range_.size() && exp_avg_sq_.numel() == range_.size() &&
                    exp_avg_.dtype() == DType::f32 && exp_avg_sq_.dtype() == DType::f32,
                "AdamW: the moments must be f32 tensors of ", range_.size(), " elements (the optimizer's range); ",
                "load a checkpoint's state with copy_from into exp_avg()/exp_avg_sq()");
  adamw_step(flat_params + range_.begin, flat_grads + range_.begin, exp_avg_.f32(), exp_avg_sq_.f32(), range_, decay_,
             h, steps_ + 1);
  ++steps_;
}

void AdamW::set_steps_taken(int64_t steps) {
  NEXTRON_CHECK(steps >= 0, "AdamW: the step count must be >= 0, got ", steps);
  steps_ = steps;
}

}  // namespace nextron
