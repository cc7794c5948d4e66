// Learning-rate schedules: linear warmup, then constant, linear or cosine decay to min_lr (Megatron-LM's
// OptimizerParamScheduler with lr_warmup_init = 0).
#pragma once

#include <cstdint>
#include <string>

namespace nextron {

enum class LrDecayStyle { constant, linear, cosine };

// "constant", "linear" or "cosine"; anything else is a nextron::Error listing the choices.
LrDecayStyle parse_lr_decay_style(const std::string& name);
const char* lr_decay_style_name(LrDecayStyle s);

struct LrScheduleConfig {
  LrDecayStyle style = LrDecayStyle::cosine;
  double lr = 3e-4;          // peak learning rate
  double min_lr = 0.0;       // floor reached at decay_steps (unused by "constant")
  int64_t warmup_steps = 0;  // 0: no warmup
  int64_t decay_steps = 0;   // the total number of training steps (end of the decay)
};

// lr(s), where s = the number of optimizer steps already taken (0 for the first update), as Megatron computes it:
//   s <= warmup_steps (warmup_steps > 0):  lr * s / warmup_steps  (so the first update uses lr 0 and update
//                                           number warmup_steps + 1, i.e. s = warmup_steps, the peak)
//   constant:                               lr
//   s > decay_steps:                        min_lr
//   otherwise, with r = (s - warmup_steps) / (decay_steps - warmup_steps) in [0, 1]:
//     linear: min_lr + (lr - min_lr) * (1 - r);  cosine: min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * r))
class LrSchedule {
 public:
  // Validates: lr >= 0, 0 <= min_lr <= lr, warmup_steps >= 0, decay_steps >= warmup_steps, and decay_steps > 0
  // for linear/cosine; a violation is a nextron::Error naming the setting.
  explicit LrSchedule(const LrScheduleConfig& c);
  const LrScheduleConfig& config() const { return c_; }
  // s >= 0 (a negative step is an error).
  double lr_at(int64_t s) const;

 private:
  LrScheduleConfig c_;
};

}  // namespace nextron
