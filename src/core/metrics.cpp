#include "core/metrics.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "core/error.h"

namespace nextron {

namespace {
// JSON has no NaN or infinity: a non-finite value (a diverged loss) is written as null.
nlohmann::json number(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

template <typename... Args>
std::string printf_string(const char* format, Args... args) {
  char buf[256];
  const int n = std::snprintf(buf, sizeof(buf), format, args...);
  return std::string(buf, static_cast<size_t>(std::clamp(n, 0, static_cast<int>(sizeof(buf)) - 1)));
}

// `decimals` fixed digits for ordinary values, scientific notation from 1e5 on: a diverging run's gradient norm of
// 6e37 would otherwise print as 38 digits.
std::string fixed_or_sci(double v, int decimals) {
  return printf_string(std::fabs(v) < 1e5 || !std::isfinite(v) ? "%.*f" : "%.*e", decimals, v);
}
}  // namespace

nlohmann::json to_json(const StepMetrics& m) {
  nlohmann::json j{{"kind", "train"},
                   {"step", m.step},
                   {"total_steps", m.total_steps},
                   {"loss", number(m.loss)},
                   {"lm_loss", number(m.lm_loss)},
                   {"aux_loss", number(m.aux_loss)},
                   {"lr", number(m.lr)},
                   {"grad_norm", number(m.grad_norm)},
                   {"tokens_per_s", number(m.tokens_per_s)},
                   {"mfu", number(m.mfu)},
                   {"seconds", number(m.seconds)},
                   {"tokens", m.tokens}};
  if (m.pipeline_bubble >= 0) j["pipeline_bubble"] = number(m.pipeline_bubble);
  if (!m.breakdown.is_null()) j["breakdown"] = m.breakdown;
  return j;
}

nlohmann::json to_json(const ValidMetrics& m) {
  return nlohmann::json{{"kind", "valid"},
                        {"step", m.step},
                        {"valid_loss", number(m.valid_loss)},
                        {"seconds", number(m.seconds)},
                        {"tokens", m.tokens}};
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "-";
  if (seconds < 60) return printf_string("%.1fs", seconds);
  const auto s = static_cast<int64_t>(std::llround(seconds));
  if (s < 3600) return printf_string("%lldm%02llds", static_cast<long long>(s / 60), static_cast<long long>(s % 60));
  return printf_string("%lldh%02lldm%02llds", static_cast<long long>(s / 3600), static_cast<long long>(s / 60 % 60),
                       static_cast<long long>(s % 60));
}

nlohmann::json to_json(const ExpertLoadMetrics& m) {
  nlohmann::json imbalance = nlohmann::json::array(), dropped = nlohmann::json::array();
  for (size_t i = 0; i < m.tokens.size(); ++i) {
    double sum = 0, most = 0;
    for (float v : m.tokens[i]) {
      sum += v;
      most = std::max(most, static_cast<double>(v));
    }
    imbalance.push_back(sum > 0 ? most * static_cast<double>(m.tokens[i].size()) / sum : 0.0);
    dropped.push_back(sum > 0 && i < m.dropped.size() ? m.dropped[i] / sum : 0.0);
  }
  return {{"kind", "expert_load"},      {"step", m.step},
          {"layers", m.layers},         {"tokens", m.tokens},
          {"max_over_mean", imbalance}, {"dropped_fraction", dropped}};
}

std::string format_step_line(const StepMetrics& m) {
  std::string line =
      printf_string("step %lld/%lld", static_cast<long long>(m.step), static_cast<long long>(m.total_steps));
  line += " | loss " + fixed_or_sci(m.loss, 4) + " | lm " + fixed_or_sci(m.lm_loss, 4) + " | aux " +
          fixed_or_sci(m.aux_loss, 4);
  line += printf_string(" | lr %.3e | gnorm ", m.lr) + fixed_or_sci(m.grad_norm, 3);
  line += printf_string(" | tok/s %.0f | mfu %.2f%%", m.tokens_per_s, 100.0 * m.mfu);
  if (m.pipeline_bubble >= 0) line += printf_string(" | bubble %.1f%%", 100.0 * m.pipeline_bubble);
  line += printf_string(" | tokens %lld | elapsed ", static_cast<long long>(m.tokens)) + format_duration(m.seconds);
  return line;
}

std::string format_valid_line(const ValidMetrics& m) {
  return printf_string("valid step %lld | loss %.4f | tokens %lld | elapsed ", static_cast<long long>(m.step),
                       m.valid_loss, static_cast<long long>(m.tokens)) +
         format_duration(m.seconds);
}

MetricsLog::MetricsLog(const std::string& path) : path_(path) {
  namespace fs = std::filesystem;
  NEXTRON_CHECK(!path.empty(), "metrics log: empty path; pass --metrics PATH or --save-dir");
  const fs::path p(path);
  std::error_code ec;
  if (p.has_parent_path()) {
    fs::create_directories(p.parent_path(), ec);
    NEXTRON_CHECK(!ec, "metrics log: cannot create the directory ", p.parent_path().string(), " (", ec.message(),
                  "); choose a writable location");
  }
  // A resumed run appends; a last line cut short (a crash mid-write) is terminated so records stay one per line.
  bool needs_newline = false;
  if (fs::exists(p, ec) && fs::file_size(p, ec) > 0 && !ec) {
    std::ifstream in(path, std::ios::binary);
    in.seekg(-1, std::ios::end);
    char last = '\n';
    if (in.get(last)) needs_newline = last != '\n';
  }
  out_.open(path, std::ios::out | std::ios::app | std::ios::binary);
  NEXTRON_CHECK(out_.is_open(), "metrics log: cannot open ", path,
                " for appending; check that the directory is writable or pass another --metrics path");
  if (needs_newline) out_ << '\n';
}

void MetricsLog::write(const nlohmann::json& record) {
  out_ << record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
  out_.flush();
  NEXTRON_CHECK(out_.good(), "metrics log: writing to ", path_, " failed; check free disk space");
}

ProgressBar::ProgressBar(int64_t total_steps, std::ostream& os, int64_t start_step)
    : total_(total_steps), start_step_(start_step), os_(os) {
  const bool err_tty = (&os == &std::cerr || &os == &std::clog) && isatty(STDERR_FILENO);
  const bool out_tty = &os == &std::cout && isatty(STDOUT_FILENO);
  enabled_ = total_steps > 0 && (err_tty || out_tty);
}

ProgressBar::~ProgressBar() {
  try {
    finish();
  } catch (...) {
  }
}

std::string ProgressBar::render(const StepMetrics& m, int64_t total_steps, int64_t start_step, int width) {
  const double frac =
      total_steps > 0 ? std::clamp(static_cast<double>(m.step) / static_cast<double>(total_steps), 0.0, 1.0) : 0.0;
  const int done = static_cast<int>(frac * width);
  std::string bar(1, '[');
  bar.append(static_cast<size_t>(done), '#');
  bar.append(static_cast<size_t>(std::max(width - done, 0)), '.');
  bar += "] ";
  bar += printf_string("%lld/%lld  loss %.4f  %.0f tok/s  eta ", static_cast<long long>(m.step),
                       static_cast<long long>(total_steps), m.loss, m.tokens_per_s);
  const int64_t steps_here = m.step - start_step;
  if (steps_here > 0 && m.seconds > 0) {
    const double per_step = m.seconds / static_cast<double>(steps_here);
    bar += format_duration(per_step * static_cast<double>(std::max<int64_t>(total_steps - m.step, 0)));
  } else {
    bar += "-";
  }
  return bar;
}

void ProgressBar::update(const StepMetrics& m) {
  if (!enabled_) return;
  const std::string line = render(m, total_, start_step_);
  os_ << '\r' << line;
  if (line.size() < last_len_) os_ << std::string(last_len_ - line.size(), ' ');
  os_.flush();
  last_len_ = line.size();
  drawn_ = true;
}

void ProgressBar::clear() {
  if (!enabled_ || !drawn_) return;
  os_ << '\r' << std::string(last_len_, ' ') << '\r';
  os_.flush();
  drawn_ = false;
  last_len_ = 0;
}

void ProgressBar::finish() {
  if (!enabled_ || !drawn_) return;
  os_ << '\n';
  os_.flush();
  drawn_ = false;
  last_len_ = 0;
}

}  // namespace nextron
