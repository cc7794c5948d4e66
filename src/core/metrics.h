// Training metrics: the per-step record, its JSON Lines log, its one-line text form and a terminal progress bar.
#pragma once

#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

namespace nextron {

// What one optimizer step reports.
struct StepMetrics {
  int64_t step = 0;         // optimizer steps completed, this one included (1-based)
  int64_t total_steps = 0;  // steps the run trains for
  double loss = 0;          // lm_loss + router_aux_loss_coef * aux_loss (what training differentiates)
  double lm_loss = 0;       // next-token cross-entropy
  double aux_loss = 0;      // MoE load-balancing loss (before its coefficient), 0 without MoE layers
  double lr = 0;            // learning rate used by this step
  double grad_norm = 0;     // global gradient norm before clipping
  double tokens_per_s = 0;  // trained tokens per second of this step
  double mfu = 0;           // model FLOPs utilization as a fraction (0.25 = 25%), see docs/mfu.md
  double seconds = 0;       // wall-clock seconds since training started in this process (elapsed)
  int64_t tokens = 0;       // training tokens consumed so far in the run (cumulative, resumes included)
  // Pipeline runs: the fraction of the step's forward/backward phase the logging rank (the first stage) spent waiting
  // in pipeline exchanges, the measured bubble; -1 without a pipeline (not logged).
  double pipeline_bubble = -1;
  // --log-step-stats: the step's time split, bytes per process group and peak memory per rank (null: not logged).
  nlohmann::json breakdown;
};

// A validation result, logged with "kind": "valid".
struct ValidMetrics {
  int64_t step = 0;  // optimizer steps completed when it was measured
  double valid_loss = 0;
  double seconds = 0;  // as StepMetrics::seconds
  int64_t tokens = 0;  // as StepMetrics::tokens
};

// Per-layer expert load of one step (--moe-per-layer-logging), logged with "kind": "expert_load".
struct ExpertLoadMetrics {
  int64_t step = 0;
  std::vector<int64_t> layers;             // global indices of the MoE layers
  std::vector<std::vector<float>> tokens;  // per layer, (E) top-k assignments per expert over the global batch
  std::vector<double> dropped;             // per layer, slots dropped over capacity (0 when dropless)
};

// {"kind": "train", "step": ..., "total_steps": ..., "loss": ..., "lm_loss": ..., "aux_loss": ..., "lr": ...,
//  "grad_norm": ..., "tokens_per_s": ..., "mfu": ..., "seconds": ..., "tokens": ...}; a non-finite number is
// written as null (JSON has no NaN).
nlohmann::json to_json(const StepMetrics& m);
// {"kind": "valid", "step": ..., "valid_loss": ..., "seconds": ..., "tokens": ...}
nlohmann::json to_json(const ValidMetrics& m);
// {"kind": "expert_load", "step": ..., "layers": [...], "tokens": [[...], ...], "max_over_mean": [...],
//  "dropped_fraction": [...]}: per layer, its busiest expert's assignments over the mean (1 = perfectly balanced) and
// the share of its routed slots dropped over capacity.
nlohmann::json to_json(const ExpertLoadMetrics& m);

// The per-step log line, e.g.
// "step 12/100 | loss 3.4567 | lm 3.4501 | aux 6.6000 | lr 3.000e-04 | gnorm 1.234 | tok/s 12345 | mfu 12.34% |
//  tokens 49152 | elapsed 1m05s" (on one line).
std::string format_step_line(const StepMetrics& m);
// "valid step 12 | loss 3.5000 | tokens 49152 | elapsed 1m05s"
std::string format_valid_line(const ValidMetrics& m);
// Durations as "42.0s", "1m05s", "2h03m04s".
std::string format_duration(double seconds);

// Appends one JSON object per line to a JSON Lines file (tools/plot_metrics.py reads it), flushing after every
// line so the file is complete up to the last step whatever happens to the process. An existing file is
// appended to (a resumed run continues its log; if the old file ends in a line cut short by a crash, a newline
// is added first so the next record starts on a line of its own). The parent directory is created if needed.
class MetricsLog {
 public:
  explicit MetricsLog(const std::string& path);
  void write(const nlohmann::json& record);
  void write(const StepMetrics& m) { write(to_json(m)); }
  void write(const ValidMetrics& m) { write(to_json(m)); }
  void write(const ExpertLoadMetrics& m) { write(to_json(m)); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::ofstream out_;
};

// A one-line progress bar "[#####.....] step/total  loss  tok/s  eta", redrawn in place with '\r'. It draws only
// when `os` is std::cerr or std::clog and stderr is a terminal (or std::cout and stdout is a terminal); on any other
// stream (a file, a pipe, an ostringstream) every call does nothing, and the trainer's per-step log lines are the
// record. Call clear() before printing a log line to the same terminal and finish() at the end.
class ProgressBar {
 public:
  // start_step: steps already done when the bar starts (a resumed run), so the ETA uses this process's rate.
  ProgressBar(int64_t total_steps, std::ostream& os, int64_t start_step = 0);
  ~ProgressBar();
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  bool enabled() const { return enabled_; }
  void update(const StepMetrics& m);  // redraws the bar for step m.step
  void clear();                       // erases the bar from the current line
  void finish();                      // ends the bar's line (idempotent)

  // The bar's text (without '\r'): `width` cells of '#' (done) and '.' (to do), then the numbers. The ETA is
  // m.seconds / (m.step - start_step) * (total - m.step), shown as "eta -" before the first step.
  static std::string render(const StepMetrics& m, int64_t total_steps, int64_t start_step, int width = 30);

 private:
  int64_t total_;
  int64_t start_step_;
  std::ostream& os_;
  bool enabled_;
  bool drawn_ = false;  // something is on the current line
  size_t last_len_ = 0;
};

}  // namespace nextron
