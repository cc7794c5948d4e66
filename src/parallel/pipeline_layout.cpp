#include "parallel/pipeline_layout.h"

#include <cctype>

#include "core/error.h"

namespace nextron {

namespace {

// Expands repetitions and groups: "E(t|)*2tL" -> "Et|t|tL". Throws for anything else.
class LayoutParser {
 public:
  explicit LayoutParser(const std::string& text) : s_(text) {}

  std::string expand() {
    std::string out = sequence(0);
    NEXTRON_CHECK(pos_ == s_.size(), where(), "')' without a matching '('");
    return out;
  }

 private:
  std::string where() const {
    return detail::concat("--pipeline-model-parallel-layout \"", s_, "\": at character ", pos_ + 1, ": ");
  }
  void skip_blanks() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == ',')) ++pos_;
  }
  std::string sequence(int depth) {
    NEXTRON_CHECK(depth < 32, where(), "groups nested more than 32 deep");
    std::string out;
    for (skip_blanks(); pos_ < s_.size() && s_[pos_] != ')'; skip_blanks()) {
      std::string item;
      const char ch = s_[pos_];
      if (ch == '(') {
        ++pos_;
        item = sequence(depth + 1);
        NEXTRON_CHECK(pos_ < s_.size() && s_[pos_] == ')', where(), "'(' without a matching ')'");
        ++pos_;
      } else if (ch == 'E' || ch == 't' || ch == 'L' || ch == '|') {
        item = std::string(1, ch);
        ++pos_;
      } else if (ch == 'm') {
        throw Error(where() +
                    "'m' (a multi-token-prediction layer): Qwen3-Next training here has no MTP layers; "
                    "remove it");
      } else {
        throw Error(where() + "unexpected '" + std::string(1, ch) +
                    "': use E (embedding), t (decoder layer), L (loss), | (next stage), x*n and (...)*n");
      }
      skip_blanks();
      int64_t times = 1;
      if (pos_ < s_.size() && s_[pos_] == '*') {
        ++pos_;
        skip_blanks();
        NEXTRON_CHECK(pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_])), where(),
                      "'*' must be followed by a repeat count");
        times = 0;
        while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) {
          times = times * 10 + (s_[pos_++] - '0');
          NEXTRON_CHECK(times <= 100000, where(), "repeat count above 100000");
        }
      }
      for (int64_t k = 0; k < times; ++k) out += item;
      NEXTRON_CHECK(out.size() <= 1000000, where(), "the layout expands to more than a million symbols");
    }
    return out;
  }

  const std::string& s_;
  size_t pos_ = 0;
};

std::vector<StageRange> from_layout(const ModelConfig& config, int pp, int vpp, const std::string& text) {
  const std::string flat = LayoutParser(text).expand();
  std::vector<std::string> stages(1);
  for (char ch : flat) {
    if (ch == '|')
      stages.emplace_back();
    else
      stages.back() += ch;
  }
  const int n = static_cast<int>(stages.size());
  const std::string name = "--pipeline-model-parallel-layout \"" + text + "\"";
  NEXTRON_CHECK(n % pp == 0, name, " has ", n, " stages, not a multiple of PP ", pp,
                ": write PP x VPP stages separated by '|'");
  NEXTRON_CHECK(vpp == 1 || n == pp * vpp, name, " has ", n, " stages but PP ", pp, " x VPP ", vpp, " = ", pp * vpp,
                ": the layout sets VPP itself; leave --virtual-pipeline-model-parallel-size unset");
  std::vector<StageRange> out;
  int64_t layer = 0;
  for (int s = 0; s < n; ++s) {
    const std::string& st = stages[s];
    const size_t e = st.find('E'), l = st.find('L');
    NEXTRON_CHECK(e == std::string::npos || (s == 0 && e == 0 && st.find('E', 1) == std::string::npos), name,
                  ": 'E' (the embedding) belongs once at the start of the first stage");
    NEXTRON_CHECK(l == std::string::npos || (s + 1 == n && l + 1 == st.size() && st.find('L') == l), name,
                  ": 'L' (the loss) belongs once at the end of the last stage");
    const int64_t layers = static_cast<int64_t>(st.size()) - (e != std::string::npos) - (l != std::string::npos);
    NEXTRON_CHECK(layers > 0 || s == 0 || s + 1 == n, name, ": stage ", s,
                  " is empty; every stage between the first and the last needs at least one layer 't'");
    out.push_back({layer, layer + layers, s == 0, s + 1 == n});
    layer += layers;
  }
  NEXTRON_CHECK(stages.front().find('E') == 0, name, ": the first stage must start with 'E' (the embedding)");
  NEXTRON_CHECK(!stages.back().empty() && stages.back().back() == 'L', name,
                ": the last stage must end with 'L' (the loss)");
  NEXTRON_CHECK(layer == config.num_hidden_layers, name, " places ", layer, " decoder layers 't' but the model has ",
                config.num_hidden_layers);
  return out;
}

}  // namespace

int pipeline_chunks(const PipelineSplit& split, int pp, int vpp) {
  if (split.layout.empty() || pp < 1) return vpp;
  int n = 1;
  for (char ch : LayoutParser(split.layout).expand()) n += ch == '|';
  return n % pp == 0 ? n / pp : vpp;  // pipeline_stages() names a count that does not divide
}

std::vector<StageRange> pipeline_stages(const ModelConfig& config, int pp, int vpp, const PipelineSplit& split) {
  NEXTRON_CHECK(pp >= 1 && vpp >= 1, "pipeline size ", pp, " x ", vpp, " chunks: both must be >= 1");
  const int64_t L = config.num_hidden_layers, n = int64_t{pp} * vpp;
  std::vector<StageRange> stages;
  if (!split.layout.empty()) {
    NEXTRON_CHECK(split.first_stage_layers == 0 && split.last_stage_layers == 0,
                  "--pipeline-model-parallel-layout and --decoder-first/last-pipeline-num-layers both set: the layout "
                  "already places every layer; give one of them");
    stages = from_layout(config, pp, vpp, split.layout);
  } else if (split.first_stage_layers > 0 || split.last_stage_layers > 0) {
    NEXTRON_CHECK(vpp == 1, "--decoder-first/last-pipeline-num-layers with VPP ", vpp,
                  ": uneven interleaved stages need --pipeline-model-parallel-layout");
    NEXTRON_CHECK(pp >= 2, "--decoder-first/last-pipeline-num-layers need PP >= 2");
    const int64_t first = split.first_stage_layers, last = split.last_stage_layers;
    const int64_t middle_stages = pp - (first > 0) - (last > 0);
    const int64_t rest = L - first - last;
    NEXTRON_CHECK(rest >= 0, "--decoder-first/last-pipeline-num-layers (", first, " + ", last, ") exceed the ", L,
                  " layers of the model");
    NEXTRON_CHECK(middle_stages == 0 ? rest == 0 : rest % middle_stages == 0 && rest / middle_stages > 0,
                  "after the first and last stages' layers (", first, ", ", last, "), ", rest,
                  " layers do not split evenly over the other ", middle_stages,
                  " stages: choose counts that leave a positive multiple of ", middle_stages);
    const int64_t per = middle_stages > 0 ? rest / middle_stages : 0;
    int64_t begin = 0;
    for (int s = 0; s < pp; ++s) {
      const int64_t count = s == 0 && first > 0 ? first : s + 1 == pp && last > 0 ? last : per;
      stages.push_back({begin, begin + count, s == 0, s + 1 == pp});
      begin += count;
    }
  } else {
    NEXTRON_CHECK(L % n == 0, "num_hidden_layers ", L, " is not divisible by PP x VPP = ", pp, " x ", vpp,
                  ": choose pipeline sizes whose product divides the layer count, or place the layers with "
                  "--pipeline-model-parallel-layout");
    const int64_t per = L / n;
    for (int64_t s = 0; s < n; ++s) stages.push_back({s * per, (s + 1) * per, s == 0, s + 1 == n});
  }
  for (const StageRange& s : stages) s.validate(config);
  return stages;
}

std::vector<StageRange> rank_chunks(const std::vector<StageRange>& stages, int pp, int pp_rank) {
  const int n = static_cast<int>(stages.size());
  NEXTRON_CHECK(pp >= 1 && n % pp == 0 && pp_rank >= 0 && pp_rank < pp, "pipeline rank ", pp_rank, " of ", pp, " over ",
                n, " virtual stages");
  std::vector<StageRange> chunks;
  for (int c = 0; c * pp < n; ++c) chunks.push_back(stages[c * pp + pp_rank]);
  return chunks;
}

}  // namespace nextron
