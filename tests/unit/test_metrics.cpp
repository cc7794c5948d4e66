// Metrics: JSON Lines records read back with their values, appending on resume, the progress bar staying silent
// off a terminal, and the log line naming every field.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/metrics.h"

namespace nextron::test {

namespace {
StepMetrics sample(int64_t step) {
  StepMetrics m;
  m.step = step;
  m.total_steps = 100;
  m.loss = 3.25 + 0.001 * static_cast<double>(step);
  m.lm_loss = 3.125;
  m.aux_loss = 6.5;
  m.lr = 3e-4;
  m.grad_norm = 1.75;
  m.tokens_per_s = 12345.5;
  m.mfu = 0.1234;
  m.seconds = 65.0;
  m.tokens = 4096 * step;
  return m;
}

std::vector<nlohmann::json> read_lines(const std::string& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

// A fresh directory under the test temp dir, removed at scope exit.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& name)
      : path(std::filesystem::path(testing::TempDir()) / ("nextron_metrics_" + name)) {
    std::filesystem::remove_all(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
};
}  // namespace

TEST(Metrics, JsonLinesReadBackWithTheSameValues) {
  TempDir dir("read_back");
  const std::string path = (dir.path / "sub" / "metrics.jsonl").string();  // the directory is created
  {
    MetricsLog log(path);
    log.write(sample(1));
    log.write(sample(2));
    log.write(ValidMetrics{2, 3.5, 65.0, 8192});
  }
  const auto lines = read_lines(path);
  ASSERT_EQ(lines.size(), 3u);
  for (int i = 0; i < 2; ++i) {
    const StepMetrics m = sample(i + 1);
    const auto& j = lines[static_cast<size_t>(i)];
    EXPECT_EQ(j.at("kind"), "train");
    EXPECT_EQ(j.at("step").get<int64_t>(), m.step);
    EXPECT_EQ(j.at("total_steps").get<int64_t>(), m.total_steps);
    EXPECT_EQ(j.at("loss").get<double>(), m.loss);  // exact: nlohmann writes round-trip precision
    EXPECT_EQ(j.at("lm_loss").get<double>(), m.lm_loss);
    EXPECT_EQ(j.at("aux_loss").get<double>(), m.aux_loss);
    EXPECT_EQ(j.at("lr").get<double>(), m.lr);
    EXPECT_EQ(j.at("grad_norm").get<double>(), m.grad_norm);
    EXPECT_EQ(j.at("tokens_per_s").get<double>(), m.tokens_per_s);
    EXPECT_EQ(j.at("mfu").get<double>(), m.mfu);
    EXPECT_EQ(j.at("seconds").get<double>(), m.seconds);
    EXPECT_EQ(j.at("tokens").get<int64_t>(), m.tokens);
  }
  EXPECT_EQ(lines[2].at("kind"), "valid");
  EXPECT_EQ(lines[2].at("step").get<int64_t>(), 2);
  EXPECT_EQ(lines[2].at("valid_loss").get<double>(), 3.5);
  EXPECT_EQ(lines[2].at("tokens").get<int64_t>(), 8192);
}

TEST(Metrics, NonFiniteValuesAreNull) {
  StepMetrics m = sample(1);
  m.loss = std::nan("");
  m.grad_norm = INFINITY;
  const auto j = nlohmann::json::parse(to_json(m).dump());
  EXPECT_TRUE(j.at("loss").is_null());
  EXPECT_TRUE(j.at("grad_norm").is_null());
  EXPECT_EQ(j.at("lm_loss").get<double>(), 3.125);
}

TEST(Metrics, ReopeningAppends) {
  TempDir dir("append");
  const std::string path = (dir.path / "metrics.jsonl").string();
  {
    MetricsLog log(path);
    log.write(sample(1));
    log.write(sample(2));
  }
  {
    MetricsLog log(path);  // a resumed run
    log.write(sample(3));
  }
  const auto lines = read_lines(path);
  ASSERT_EQ(lines.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(lines[static_cast<size_t>(i)].at("step").get<int64_t>(), i + 1);
}

TEST(Metrics, AppendAfterTruncatedLineStartsANewLine) {
  TempDir dir("truncated");
  std::filesystem::create_directories(dir.path);
  const std::string path = (dir.path / "metrics.jsonl").string();
  {
    std::ofstream f(path);
    f << to_json(sample(1)).dump() << "\n{\"kind\": \"train\", \"step\": 2, \"lo";  // a crash mid-write
  }
  {
    MetricsLog log(path);
    log.write(sample(2));
  }
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(nlohmann::json::parse(lines[0]).at("step").get<int64_t>(), 1);
  // The cut line stays on its own line, and the new record is whole.
  EXPECT_FALSE(nlohmann::json::accept(lines[1]));
  EXPECT_EQ(nlohmann::json::parse(lines[2]).at("step").get<int64_t>(), 2);
}

TEST(Metrics, UnwritablePathIsAnError) {
  TempDir dir("unwritable");
  std::filesystem::create_directories(dir.path / "a_directory");
  EXPECT_THROW(MetricsLog((dir.path / "a_directory").string()), Error);
  EXPECT_THROW(MetricsLog(""), Error);
}

TEST(Metrics, StepLineContainsEveryField) {
  const std::string line = format_step_line(sample(12));
  for (const char* part : {"step 12/100", "loss 3.2620", "lm 3.1250", "aux 6.5000", "lr 3.000e-04", "gnorm 1.750",
                           "tok/s 12346", "mfu 12.34%", "tokens 49152", "elapsed 1m05s"}) {
    EXPECT_NE(line.find(part), std::string::npos) << "'" << part << "' missing from: " << line;
  }
  EXPECT_EQ(line.find('\n'), std::string::npos);
  const std::string valid = format_valid_line(ValidMetrics{12, 3.5, 65.0, 49152});
  EXPECT_NE(valid.find("valid step 12"), std::string::npos) << valid;
  EXPECT_NE(valid.find("loss 3.5000"), std::string::npos) << valid;
}

// A diverging run's huge values print short (a gradient norm of 6e37 as 6.000e+37, not 38 digits); ordinary values
// keep their fixed decimals.
TEST(Metrics, LargeValuesPrintInScientificNotation) {
  StepMetrics m = sample(2);
  m.grad_norm = 6e37;
  m.loss = 123456.0;
  const std::string line = format_step_line(m);
  EXPECT_NE(line.find("gnorm 6.000e+37"), std::string::npos) << line;
  EXPECT_NE(line.find("loss 1.2346e+05"), std::string::npos) << line;
  EXPECT_EQ(line.find("000000000000"), std::string::npos) << line;
  m.grad_norm = 99999.5;
  EXPECT_NE(format_step_line(m).find("gnorm 99999.500"), std::string::npos) << format_step_line(m);
}

TEST(Metrics, Durations) {
  EXPECT_EQ(format_duration(4.5), "4.5s");
  EXPECT_EQ(format_duration(65), "1m05s");
  EXPECT_EQ(format_duration(7384), "2h03m04s");
  EXPECT_EQ(format_duration(-1), "-");
  EXPECT_EQ(format_duration(std::nan("")), "-");
}

TEST(ProgressBar, SilentOnANonTerminalStream) {
  std::ostringstream os;
  {
    ProgressBar bar(100, os);
    EXPECT_FALSE(bar.enabled());
    for (int64_t s = 1; s <= 3; ++s) bar.update(sample(s));
    bar.clear();
    bar.finish();
  }
  EXPECT_TRUE(os.str().empty()) << os.str();
}

TEST(ProgressBar, RenderShowsBarStepLossSpeedAndEta) {
  StepMetrics m = sample(25);
  m.loss = 2.5;
  m.tokens_per_s = 1000;
  m.seconds = 50;  // 2 s per step over 25 steps -> 75 steps left take 150 s
  EXPECT_EQ(ProgressBar::render(m, 100, 0, 20), "[#####...............] 25/100  loss 2.5000  1000 tok/s  eta 2m30s");
  // Resumed at step 20: 5 steps in 50 s -> 10 s per step -> 750 s left.
  EXPECT_NE(ProgressBar::render(m, 100, 20, 20).find("eta 12m30s"), std::string::npos);
  m.step = 0;
  EXPECT_NE(ProgressBar::render(m, 100, 0, 20).find("eta -"), std::string::npos);
  m.step = 150;  // past the end: a full bar, no negative ETA
  EXPECT_EQ(ProgressBar::render(m, 100, 0, 4).substr(0, 7), "[####] ");
}

}  // namespace nextron::test
