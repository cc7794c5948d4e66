// Prompt files shared by nextron-generate (--prompt-file) and training samples (nextron-train --sample-prompts):
// JSON Lines ({"text": ...} or {"ids": [...]} per line) when the name ends in .jsonl, else one text prompt per line.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "generate/tokenizer.h"

namespace nextron {

struct PromptSpec {
  std::optional<std::string> text;  // a text prompt (tokenized later), or
  std::vector<int64_t> ids;         // token ids
};

// Blank lines are skipped; every problem names the file, the line and the fix (`option` names the flag).
std::vector<PromptSpec> read_prompt_file(const std::string& path, const std::string& option = "--prompt-file");
// Ids of every prompt: texts through `tokenizer` (one call for all), which must be given when any prompt is text.
std::vector<std::vector<int64_t>> prompt_ids(std::vector<PromptSpec>& prompts, const Tokenizer* tokenizer);

}  // namespace nextron
