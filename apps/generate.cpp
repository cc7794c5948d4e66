// nextron-generate: sample text from an HF checkpoint or a nextron training checkpoint, with the DeltaNet state and
// attention KV caches (src/generate). Prompts as text (through a tokenizer) or token ids; greedy or sampled; one
// JSON line per prompt.
#include <algorithm>
#include <boost/program_options.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <vector>

#include "cli.h"
#include "core/error.h"
#include "core/parallel_for.h"
#include "generate/generator.h"
#include "generate/model_source.h"
#include "generate/prompts.h"
#include "generate/tokenizer.h"
#include "model/model.h"
#ifdef NEXTRON_HAVE_CUDA
#include "core/cuda/device.h"
#include "kernels/cuda/cuda_ops.h"
#endif

namespace po = boost::program_options;
using namespace nextron;

namespace {

std::vector<int64_t> parse_ids(const std::string& s, const std::string& where) {
  std::istringstream is(s);
  std::vector<int64_t> ids;
  std::string word;
  while (is >> word) {
    const std::optional<int64_t> id = cli::parse_int64(word);
    NEXTRON_CHECK(id.has_value(), where, ": '", word, "' is not an integer token id");
    ids.push_back(*id);
  }
  NEXTRON_CHECK(!ids.empty(), where, " holds no token ids");
  return ids;
}

// The end-of-sequence ids an HF checkpoint declares: generation_config.json's eos_token_id, else config.json's (an
// integer, a list, or null).
std::vector<int64_t> hf_eos_ids(const std::string& dir) {
  for (const char* file : {"generation_config.json", "config.json"}) {
    const auto path = std::filesystem::path(dir) / file;
    if (!std::filesystem::exists(path)) continue;
    std::ifstream f(path);
    const nlohmann::json j = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
    NEXTRON_CHECK(!j.is_discarded() && j.is_object(), "'", path.string(),
                  "' is not a JSON object, so its eos_token_id cannot be read: repair it, or give --eos-id / "
                  "--ignore-eos");
    if (!j.contains("eos_token_id")) continue;
    const nlohmann::json& e = j["eos_token_id"];
    if (e.is_number_integer()) return {e.get<int64_t>()};
    if (e.is_array()) {
      std::vector<int64_t> ids;
      for (const auto& v : e)
        if (v.is_number_integer()) ids.push_back(v.get<int64_t>());
      if (!ids.empty()) return ids;
    }
  }
  return {};
}

std::shared_ptr<Ops> make_ops(const std::string& device) {
  NEXTRON_CHECK(device == "cpu" || device == "cuda", "--device must be cpu or cuda, got '", device, "'");
  if (device == "cpu") return nullptr;
#ifdef NEXTRON_HAVE_CUDA
  NEXTRON_CHECK(cuda::device_count() > 0,
                "--device cuda: no GPU is visible (check the driver and CUDA_VISIBLE_DEVICES), or use --device cpu");
  return std::make_shared<CudaOps>(0, CudaOpsOptions{});
#else
  throw Error(
      "--device cuda: this nextron-generate was built without the CUDA backend (no nvcc at configure time); use "
      "--device cpu");
#endif
}

int run(int argc, char** argv) {
  std::string model_path, tokenizer_spec, prompt_file, out_path, device = "cpu";
  std::vector<std::string> prompt_texts, prompt_id_lists, stops;
  std::vector<int64_t> eos_ids;
  bool ignore_eos = false;
  int threads = 0;
  GenerateOptions g;
  po::options_description opts(
      "nextron-generate: sample text from a Qwen3-Next checkpoint\n\n"
      "Usage: nextron-generate --model DIR [--tokenizer byte|tokenizer.json] (--prompt TEXT | --prompt-ids IDS |\n"
      "       --prompt-file F)... [--max-new-tokens N] [--temperature T --top-k K --top-p P --seed S] [--out F]\n\n"
      "Writes one JSON line per prompt: {\"index\", \"prompt\", \"prompt_ids\", \"ids\", \"text\", "
      "\"finish_reason\"}\n(finish_reason: eos, stop or length). Prompts run in the order: --prompt-file, "
      "--prompt, --prompt-ids.\n\nOptions");
  opts.add_options()("help,h", "show this help")(
      "model", po::value(&model_path)->required(),
      "HF checkpoint directory, training checkpoint (SAVE/step_N) or a training run's SAVE folder (its newest "
      "checkpoint)")("tokenizer", po::value(&tokenizer_spec),
                     "byte (token = UTF-8 byte, EOS 256: tools/preprocess.py --tokenizer byte) or an HF "
                     "tokenizer.json (or its folder); needed for text prompts, text output and --stop")(
      "prompt", po::value(&prompt_texts)->composing(), "a text prompt (repeatable)")(
      "prompt-ids", po::value(&prompt_id_lists)->composing(),
      "a prompt as whitespace-separated token ids (repeatable)")(
      "prompt-file", po::value(&prompt_file),
      "prompts: JSON Lines ({\"text\": ...} or {\"ids\": [...]}) if it ends in .jsonl, else one text per line")(
      "max-new-tokens", po::value(&g.max_new_tokens)->default_value(64), "tokens generated per prompt at most")(
      "temperature", po::value(&g.sampling.temperature)->default_value(0.0), "0: greedy; > 0: sample")(
      "top-k", po::value(&g.sampling.top_k)->default_value(0), "sample from the k most likely tokens (0: all)")(
      "top-p", po::value(&g.sampling.top_p)->default_value(1.0),
      "sample from the most likely tokens whose probability reaches p (1: all)")(
      "seed", po::value(&g.sampling.seed)->default_value(0), "random seed of the sampler")(
      "stop", po::value(&stops)->composing(), "stop when the generated text contains this string (repeatable)")(
      "eos-id", po::value(&eos_ids)->composing(),
      "end-of-sequence token id (repeatable; default: the checkpoint's generation_config.json / config.json "
      "eos_token_id, else the tokenizer's)")("ignore-eos", po::bool_switch(&ignore_eos),
                                             "never stop at an end-of-sequence token")(
      "batch-size", po::value(&g.batch_size)->default_value(8), "prompts decoded together")(
      "device", po::value(&device)->default_value(device), "cpu or cuda")(
      "threads", po::value(&threads)->default_value(0), "CPU threads (0: all cores)")(
      "out", po::value(&out_path), "write the JSON lines to this file (default: standard output)")(
      "output-logits", po::bool_switch(&g.keep_logits),
      "add \"logits\": every new token's logits (new tokens x vocab) to each line");
  po::variables_map vm;
  if (!cli::parse_or_help(argc, argv, opts, vm)) return 0;
  NEXTRON_CHECK(threads >= 0, "--threads must be >= 0, got ", threads);
  if (threads > 0) set_cpu_threads(threads);
  g.sampling.validate();

  // Everything about the input is checked before the weights load.
  std::vector<PromptSpec> prompts;
  if (!prompt_file.empty()) prompts = read_prompt_file(prompt_file);
  for (const std::string& t : prompt_texts) prompts.push_back({t, {}});
  for (const std::string& s : prompt_id_lists) prompts.push_back({std::nullopt, parse_ids(s, "--prompt-ids")});
  NEXTRON_CHECK(!prompts.empty(), "no prompts: give --prompt, --prompt-ids or --prompt-file");
  std::unique_ptr<Tokenizer> tokenizer;
  if (!tokenizer_spec.empty()) tokenizer = make_tokenizer(tokenizer_spec);
  bool any_text = false;
  for (const PromptSpec& p : prompts) any_text |= p.text.has_value();
  NEXTRON_CHECK(tokenizer || !any_text, "text prompts need --tokenizer (byte, or an HF tokenizer.json)");
  NEXTRON_CHECK(tokenizer || stops.empty(), "--stop needs --tokenizer to decode the generated text");
  g.stop_strings = stops;
  const ModelSource source = open_model_source(model_path);
  const ModelConfig& config = source.config;
  if (tokenizer)
    NEXTRON_CHECK(tokenizer->vocab_size() <= config.vocab_size, "the tokenizer '", tokenizer->name(), "' has ",
                  tokenizer->vocab_size(), " tokens, more than the model's vocabulary of ", config.vocab_size,
                  ": pass the tokenizer the model was trained with");
  const std::vector<std::vector<int64_t>> ids = prompt_ids(prompts, tokenizer.get());
  if (!ignore_eos) {
    g.eos_ids = eos_ids;
    if (g.eos_ids.empty() && source.kind == ModelSource::Kind::hf) g.eos_ids = hf_eos_ids(source.dir);
    if (g.eos_ids.empty() && tokenizer && tokenizer->eos_id()) g.eos_ids = {*tokenizer->eos_id()};
  } else {
    NEXTRON_CHECK(eos_ids.empty(), "--ignore-eos and --eos-id contradict each other: give one");
  }
  g.max_positions = config.max_position_embeddings;

  // --out is written as OUT.partial and renamed when complete: a failed run leaves no half-written results.
  std::unique_ptr<std::ofstream> file;
  const std::string partial = out_path + ".partial";
  if (!out_path.empty()) {
    NEXTRON_CHECK(!std::filesystem::is_directory(out_path), "--out '", out_path,
                  "' is a directory; give a file for the JSON lines");
    file = std::make_unique<std::ofstream>(partial);
    NEXTRON_CHECK(file->good(), "cannot write --out '", out_path, "' (", partial, ")");
  }
  std::ostream& out = file ? *file : std::cout;

  Model model(config, {}, make_ops(device));
  load_model_weights(source, model);
  Decoder decode;
  if (tokenizer) decode = [&](const std::vector<int64_t>& v) { return tokenizer->decode(v); };
  GenerateStats stats;
  const std::vector<Generation> results = generate(model, ids, g, decode, &stats);
  for (size_t i = 0; i < results.size(); ++i) {
    const Generation& r = results[i];
    nlohmann::json j;
    j["index"] = i;
    j["prompt"] = prompts[i].text ? nlohmann::json(*prompts[i].text) : nlohmann::json(nullptr);
    j["prompt_ids"] = r.prompt;
    j["ids"] = r.ids;
    j["text"] = tokenizer ? nlohmann::json(r.text) : nlohmann::json(nullptr);
    j["finish_reason"] = r.finish_reason;
    if (g.keep_logits) j["logits"] = r.logits;
    // Invalid UTF-8 (a byte-level tokenizer can stop inside a character) is replaced rather than refused.
    out << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  }
  out.flush();
  NEXTRON_CHECK(out.good(), "writing the results failed (disk full?)");
  if (file) {
    file->close();
    std::filesystem::rename(partial, out_path);
  }
  std::fprintf(stderr,
               "nextron-generate: %zu prompts; prefill %lld tokens at %.1f tokens/s, decode %lld tokens at %.1f "
               "tokens/s (%s)\n",
               results.size(), static_cast<long long>(stats.prefill_tokens),
               stats.prefill_tokens / std::max(stats.prefill_seconds, 1e-9),
               static_cast<long long>(stats.decode_tokens), stats.decode_tokens / std::max(stats.decode_seconds, 1e-9),
               model.ops().name());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return nextron::cli::run_main("nextron-generate", [&] { return run(argc, argv); });
}
