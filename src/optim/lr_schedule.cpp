#include "optim/lr_schedule.h"

#include <cmath>
#include <numbers>

#include "core/error.h"

namespace nextron {

LrDecayStyle parse_lr_decay_style(const std::string& name) {
  if (name == "constant") return LrDecayStyle::constant;
  if (name == "linear") return LrDecayStyle::linear;
  if (name == "cosine") return LrDecayStyle::cosine;
  throw Error("unknown LR schedule '" + name + "'; use one of: constant, linear, cosine");
}

const char* lr_decay_style_name(LrDecayStyle s) {
  switch (s) {
    case LrDecayStyle::constant:
      return "constant";
    case LrDecayStyle::linear:
      return "linear";
    case LrDecayStyle::cosine:
      return "cosine";
  }
  return "?";
}

LrSchedule::LrSchedule(const LrScheduleConfig& c) : c_(c) {
  NEXTRON_CHECK(std::isfinite(c.lr) && c.lr >= 0, "LR schedule: lr must be finite and >= 0, got ", c.lr);
  NEXTRON_CHECK(std::isfinite(c.min_lr) && c.min_lr >= 0, "LR schedule: min_lr must be finite and >= 0, got ",
                c.min_lr);
  NEXTRON_CHECK(c.min_lr <= c.lr, "LR schedule: min_lr (", c.min_lr, ") is larger than the peak lr (", c.lr,
                "); lower min_lr or raise lr");
  NEXTRON_CHECK(c.warmup_steps >= 0, "LR schedule: warmup_steps must be >= 0, got ", c.warmup_steps);
  NEXTRON_CHECK(c.decay_steps >= 0, "LR schedule: decay_steps (the total training steps) must be >= 0, got ",
                c.decay_steps);
  NEXTRON_CHECK(c.warmup_steps <= c.decay_steps, "LR schedule: warmup_steps (", c.warmup_steps,
                ") exceeds the total training steps (", c.decay_steps, "); shorten the warmup or train for more steps");
  NEXTRON_CHECK(c.style == LrDecayStyle::constant || c.decay_steps > 0, "LR schedule: '", lr_decay_style_name(c.style),
                "' decay needs decay_steps (the total training steps) > 0");
}

double LrSchedule::lr_at(int64_t s) const {
  NEXTRON_CHECK(s >= 0, "LR schedule: step must be >= 0, got ", s);
  if (c_.warmup_steps > 0 && s <= c_.warmup_steps)
    return c_.lr * static_cast<double>(s) / static_cast<double>(c_.warmup_steps);
  if (c_.style == LrDecayStyle::constant) return c_.lr;
  if (s > c_.decay_steps) return c_.min_lr;
  const double r = static_cast<double>(s - c_.warmup_steps) / static_cast<double>(c_.decay_steps - c_.warmup_steps);
  const double coeff = c_.style == LrDecayStyle::linear ? 1.0 - r : 0.5 * (std::cos(std::numbers::pi * r) + 1.0);
  return c_.min_lr + coeff * (c_.lr - c_.min_lr);
}

}  // namespace nextron
