// nextron-eval: load an HF-format Qwen3-Next checkpoint, score token sequences, write logits and per-sequence
// losses as .npy files, print the mean loss. The way to check nextron's numbers against any other tool.
#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "checkpoint/hf_checkpoint.h"
#include "checkpoint/npy.h"
#include "cli.h"
#include "core/error.h"
#include "core/parallel_for.h"
#include "model/model.h"
#include "model/param_table.h"

namespace po = boost::program_options;
using namespace nextron;

namespace {

// One sequence per line, so that loss.npy / lengths.npy / logits.npy row i is line i + 1 of the file. Every line
// must therefore produce a row that means something: a blank line or a one-token line (no next token to predict, so
// no loss) is an error naming the line rather than a silently dropped or NaN row.
std::vector<std::vector<int64_t>> read_token_file(const std::string& path, int64_t vocab) {
  NEXTRON_CHECK(std::filesystem::exists(path), "token file '", path, "' does not exist");
  NEXTRON_CHECK(!std::filesystem::is_directory(path), "--tokens '", path,
                "' is a directory; expected a token file (one sequence per line, whitespace-separated ids)");
  std::ifstream f(path);
  NEXTRON_CHECK(f.good(), "cannot open token file '", path, "'");
  std::vector<std::vector<int64_t>> seqs;
  std::string line;
  for (int64_t lineno = 1; std::getline(f, line); ++lineno) {
    std::istringstream is(line);
    std::vector<int64_t> seq;
    std::string word;
    while (is >> word) {
      const std::optional<int64_t> id = cli::parse_int64(word);
      NEXTRON_CHECK(id.has_value(), "token file '", path, "' line ", lineno, ": '", word,
                    "' is not an integer token id");
      const int64_t v = *id;
      NEXTRON_CHECK(v >= 0 && v < vocab, "token file '", path, "' line ", lineno, ": token id ", v,
                    " is outside the model's vocabulary [0, ", vocab, ")");
      seq.push_back(v);
    }
    NEXTRON_CHECK(!seq.empty(), "token file '", path, "' line ", lineno,
                  " is blank: every line is one sequence and loss.npy row i belongs to line i + 1, so blank lines "
                  "are not allowed; remove it");
    NEXTRON_CHECK(seq.size() >= 2, "token file '", path, "' line ", lineno,
                  " has 1 token: at least 2 are needed for a next-token loss; extend the sequence or remove the line");
    seqs.push_back(std::move(seq));
  }
  NEXTRON_CHECK(!f.bad(), "reading token file '", path, "' failed");
  NEXTRON_CHECK(!seqs.empty(), "token file '", path, "' holds no sequences (one sequence per line, ids separated by ",
                "spaces)");
  return seqs;
}

int run(int argc, char** argv) {
  std::string model_dir, tokens, out;
  int64_t batch = 8;
  int threads = 0;
  bool no_logits = false;
  po::options_description opts(
      "nextron-eval: score token sequences with an HF-format Qwen3-Next checkpoint\n\n"
      "Writes OUT/loss.npy (num_seqs,) f32 mean next-token cross-entropy per sequence, OUT/lengths.npy (num_seqs,)\n"
      "i64 and OUT/logits.npy (num_seqs, max_len, vocab) f32 (rows past a sequence's end are 0), and prints the\n"
      "token-weighted mean loss.\n\nOptions");
  opts.add_options()("help,h", "show this help")("model", po::value(&model_dir)->required(),
                                                 "HF checkpoint directory (config.json + safetensors)")(
      "tokens", po::value(&tokens)->required(),
      "token file: one sequence per line (at least 2 whitespace-separated ids; no blank lines), so that row i of "
      "every output is line i + 1")("out", po::value(&out)->required(),
                                    "output directory for the .npy files (created if missing)")(
      "batch-size", po::value(&batch)->default_value(8), "sequences of equal length scored together")(
      "threads", po::value(&threads)->default_value(0), "CPU threads (0: all cores)")(
      "no-logits", po::bool_switch(&no_logits), "skip logits.npy (it is large for big vocabularies)");
  po::variables_map vm;
  if (!cli::parse_or_help(argc, argv, opts, vm)) return 0;
  NEXTRON_CHECK(batch > 0, "--batch-size must be positive, got ", batch);
  NEXTRON_CHECK(threads >= 0, "--threads must be >= 0, got ", threads);
  if (threads > 0) set_cpu_threads(threads);

  // Bad input is reported before the (possibly long) weight load: the config alone gives the vocabulary size.
  const ModelConfig config = read_hf_config(model_dir);
  const auto seqs = read_token_file(tokens, config.vocab_size);
  {
    int64_t longest = 0;
    for (const auto& q : seqs) longest = std::max<int64_t>(longest, static_cast<int64_t>(q.size()));
    check_fits_in_memory(
        config, {kWeightsBytesPerParam, "fp32 weights",
                 activation_bytes_lower_bound(config, std::min<int64_t>(batch, int64_t(seqs.size())), longest)});
  }
  NEXTRON_CHECK(!std::filesystem::exists(out) || std::filesystem::is_directory(out), "--out '", out,
                "' exists and is not a directory; give a directory for the .npy files");
  Model model(config);
  load_hf_weights(model_dir, model.table(), model.params().f32());

  const int64_t n = static_cast<int64_t>(seqs.size()), V = config.vocab_size;
  int64_t max_len = 0;
  for (const auto& s : seqs) max_len = std::max<int64_t>(max_len, static_cast<int64_t>(s.size()));
  std::vector<float> loss(n, 0.0f);
  std::vector<int64_t> lengths(n);
  std::vector<float> logits;
  if (!no_logits) logits.assign(static_cast<size_t>(n * max_len * V), 0.0f);
  double total = 0;
  int64_t scored = 0;
  for (int64_t i = 0; i < n;) {
    // Consecutive sequences of equal length form one batch.
    const int64_t S = static_cast<int64_t>(seqs[i].size());
    int64_t j = i;
    std::vector<int64_t> ids;
    while (j < n && j - i < batch && static_cast<int64_t>(seqs[j].size()) == S) {
      ids.insert(ids.end(), seqs[j].begin(), seqs[j].end());
      ++j;
    }
    const int64_t B = j - i;
    model.forward(ids.data(), ids.data(), B, S);
    const auto per_seq = model.per_sequence_loss();
    for (int64_t b = 0; b < B; ++b) {
      lengths[i + b] = S;
      loss[i + b] = static_cast<float>(per_seq[b]);
      if (S > 1) {
        total += per_seq[b] * static_cast<double>(S - 1);
        scored += S - 1;
      }
      if (!no_logits)
        std::copy(model.logits().f32() + b * S * V, model.logits().f32() + (b + 1) * S * V,
                  logits.begin() + (i + b) * max_len * V);
    }
    i = j;
  }
  std::filesystem::create_directories(out);
  write_npy((std::filesystem::path(out) / "loss.npy").string(), loss.data(), {n});
  write_npy((std::filesystem::path(out) / "lengths.npy").string(), lengths.data(), {n});
  if (!no_logits) write_npy((std::filesystem::path(out) / "logits.npy").string(), logits.data(), {n, max_len, V});
  std::printf("sequences %lld  scored tokens %lld  mean loss %.6f  (per-sequence losses in %s/loss.npy)\n",
              static_cast<long long>(n), static_cast<long long>(scored), scored ? total / scored : NAN, out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return nextron::cli::run_main("nextron-eval", [&] { return run(argc, argv); });
}
