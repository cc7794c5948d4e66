#include "generate/prompts.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace nextron {

std::vector<PromptSpec> read_prompt_file(const std::string& path, const std::string& option) {
  NEXTRON_CHECK(std::filesystem::is_regular_file(path), option + " '", path, "' does not exist or is not a file");
  std::ifstream f(path);
  NEXTRON_CHECK(f.good(), "cannot open " + option + " '", path, "'");
  const bool jsonl = std::filesystem::path(path).extension() == ".jsonl";
  std::vector<PromptSpec> prompts;
  std::string line;
  for (int64_t lineno = 1; std::getline(f, line); ++lineno) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = option + " '" + path + "' line " + std::to_string(lineno);
    if (!jsonl) {
      prompts.push_back({line, {}});
      continue;
    }
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw Error(where + " is not JSON (" + e.what() + "): write one object per line, {\"text\": ...} or " +
                  "{\"ids\": [...]}");
    }
    NEXTRON_CHECK(j.is_object() && (j.contains("text") != j.contains("ids")), where,
                  " must be an object with either \"text\" (a string) or \"ids\" (a list of token ids)");
    if (j.contains("text")) {
      NEXTRON_CHECK(j["text"].is_string(), where, ": \"text\" must be a string");
      prompts.push_back({j["text"].get<std::string>(), {}});
    } else {
      NEXTRON_CHECK(j["ids"].is_array() && !j["ids"].empty(), where, ": \"ids\" must be a non-empty list");
      PromptSpec p;
      for (const auto& v : j["ids"]) {
        NEXTRON_CHECK(v.is_number_integer(), where, ": \"ids\" holds ", v.dump(), ", not an integer token id");
        p.ids.push_back(v.get<int64_t>());
      }
      prompts.push_back(std::move(p));
    }
  }
  NEXTRON_CHECK(!f.bad(), "reading " + option + " '", path, "' failed");
  NEXTRON_CHECK(!prompts.empty(), option + " '", path, "' holds no prompts");
  return prompts;
}

std::vector<std::vector<int64_t>> prompt_ids(std::vector<PromptSpec>& prompts, const Tokenizer* tokenizer) {
  std::vector<std::string> texts;
  for (const PromptSpec& p : prompts)
    if (p.text) texts.push_back(*p.text);
  NEXTRON_CHECK(texts.empty() || tokenizer != nullptr, "text prompts need a tokenizer (byte, or an HF tokenizer.json)");
  std::vector<std::vector<int64_t>> encoded;
  if (!texts.empty()) encoded = tokenizer->encode(texts);
  size_t next = 0;
  for (PromptSpec& p : prompts)
    if (p.text) p.ids = encoded.at(next++);
  std::vector<std::vector<int64_t>> ids;
  for (const PromptSpec& p : prompts) ids.push_back(p.ids);
  return ids;
}

}  // namespace nextron
