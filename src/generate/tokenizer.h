// Text <-> token ids for nextron-generate: the built-in byte tokenizer (tools/preprocess.py's ByteTokenizer) and
// HF byte-level BPE tokenizers (a `tokenizer.json`, e.g. Qwen's).
//
// The reference for both directions is the HF `tokenizers` library: encode(texts) == Tokenizer.encode(text,
// add_special_tokens=False).ids and decode(ids) == Tokenizer.decode(ids, skip_special_tokens=False).
//
// - Decoding runs here in C++ (vocabulary, added tokens and the ByteLevel decoder read from tokenizer.json).
// - Encoding a byte-level BPE needs the pre-tokenizer's Unicode-category regexes, NFC normalization and the merges,
//   which is exactly the `tokenizers` library's job; re-implementing them would be a second, subtly different
//   tokenizer. So encode() runs tools/nextron_tools/hf_tokenize.py once per call with the venv's Python (prompts are
//   encoded once per generate run, so the ~0.1 s start-up does not matter).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace nextron {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Token ids of each text; no special tokens are added (no BOS/EOS, no post-processor template). Texts must be
  // valid UTF-8 (an Error otherwise).
  virtual std::vector<std::vector<int64_t>> encode(const std::vector<std::string>& texts) const = 0;

  // The text of `ids` (see the implementations for ids that are special, unknown or split a character).
  virtual std::string decode(const std::vector<int64_t>& ids) const = 0;

  // Number of ids the tokenizer can produce: the largest id + 1 (the embedding rows a model needs for it).
  virtual int64_t vocab_size() const = 0;

  // The end-of-text id when the tokenizer itself defines one (byte: 256); none for tokenizer.json, whose EOS is the
  // model's business (config.json / generation_config.json eos_token_id).
  virtual std::optional<int64_t> eos_id() const = 0;

  // "byte", or the name of the tokenizer.json's folder / file (as tools/preprocess.py names it).
  virtual std::string name() const = 0;
};

// "byte": the built-in byte tokenizer. Anything else: the path of an HF tokenizer.json, or of the folder holding
// one. A missing file, a tokenizer that is not byte-level BPE (model.type "BPE" with decoder.type "ByteLevel") and
// an unreadable file are refused with an Error naming the problem and the fix.
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec);

// The Python that encode() runs: $NEXTRON_PYTHON if set and not empty, else the build's NEXTRON_PYTHON_DEFAULT (the
// venv of tools/setup.sh), else "python3".
std::string tokenizer_python();

// The script encode() runs: NEXTRON_SOURCE_DIR "/tools/nextron_tools/hf_tokenize.py".
std::string tokenizer_script();

// bytes as UTF-8 text the way Rust's String::from_utf8_lossy (and so the HF tokenizers' ByteLevel decoder) does it:
// each maximal subpart of an ill-formed sequence becomes one U+FFFD (Unicode's recommended practice; Python's
// bytes.decode("utf-8", errors="replace") gives the same).
std::string utf8_lossy(const std::string& bytes);

}  // namespace nextron
