// Tokenizers for nextron-generate (see tokenizer.h for the contract and why encoding goes through Python).
#include "generate/tokenizer.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

// The build passes the venv's Python (CMake's NEXTRON_PYTHON) and the source tree (where tools/ lives); the
// fallbacks let this file compile on its own.
#ifndef NEXTRON_PYTHON_DEFAULT
#define NEXTRON_PYTHON_DEFAULT "python3"
#endif
#ifndef NEXTRON_SOURCE_DIR
#define NEXTRON_SOURCE_DIR "."
#endif

extern char** environ;

namespace nextron {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// ---------------------------------------------------------------------------------------------------------------
// UTF-8

// Length of the UTF-8 sequence starting at s[i], with `ok` telling whether it is well-formed. When it is not, the
// length is that of the maximal subpart (the longest prefix of a well-formed sequence there, at least one byte),
// which is what from_utf8_lossy replaces by one U+FFFD. The ranges are Unicode's Table 3-7 (no overlong forms, no
// surrogates, nothing above U+10FFFF).
size_t utf8_sequence(const std::string& s, size_t i, bool& ok) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char b0 = byte(i);
  ok = true;
  if (b0 < 0x80) return 1;
  size_t len = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
  } else if (b0 == 0xE0) {
    len = 3, lo = 0xA0;
  } else if ((b0 >= 0xE1 && b0 <= 0xEC) || b0 == 0xEE || b0 == 0xEF) {
    len = 3;
  } else if (b0 == 0xED) {
    len = 3, hi = 0x9F;
  } else if (b0 == 0xF0) {
    len = 4, lo = 0x90;
  } else if (b0 >= 0xF1 && b0 <= 0xF3) {
    len = 4;
  } else if (b0 == 0xF4) {
    len = 4, hi = 0x8F;
  } else {
    ok = false;  // a continuation byte, C0/C1 (overlong) or F5..FF: never valid anywhere
    return 1;
  }
  for (size_t k = 1; k < len; ++k) {
    const bool in_range =
        i + k < s.size() && byte(i + k) >= (k == 1 ? lo : 0x80) && byte(i + k) <= (k == 1 ? hi : 0xBF);
    if (!in_range) {
      ok = false;
      return k;
    }
  }
  return len;
}

// Byte offset of the first ill-formed sequence of s, or npos when s is valid UTF-8.
size_t first_invalid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    bool ok = true;
    const size_t n = utf8_sequence(s, i, ok);
    if (!ok) return i;
    i += n;
  }
  return std::string::npos;
}

// Code point of the well-formed sequence s[i, i + n).
uint32_t code_point(const std::string& s, size_t i, size_t n) {
  const auto b = [&](size_t k) { return static_cast<uint32_t>(static_cast<unsigned char>(s[i + k])); };
  switch (n) {
    case 1:
      return b(0);
    case 2:
      return ((b(0) & 0x1F) << 6) | (b(1) & 0x3F);
    case 3:
      return ((b(0) & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    default:
      return ((b(0) & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The byte tokenizer

// tools/preprocess.py's ByteTokenizer: token = UTF-8 byte 0..255, EOS 256, vocabulary 257.
class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr int64_t kEos = 256;

  std::vector<std::vector<int64_t>> encode(const std::vector<std::string>& texts) const override {
    std::vector<std::vector<int64_t>> out;
    out.reserve(texts.size());
    for (const std::string& t : texts) {
      // Checked like the HF path (whose Python takes only str): a prompt that is not UTF-8 is a wrong input file.
      const size_t bad = first_invalid_utf8(t);
      NEXTRON_CHECK(bad == std::string::npos, "text ", out.size(), " is not valid UTF-8 (byte ", bad,
                    "): pass UTF-8 text");
      std::vector<int64_t>& ids = out.emplace_back();
      ids.reserve(t.size());
      for (char c : t) ids.push_back(static_cast<unsigned char>(c));
    }
    return out;
  }

  // The bytes themselves, unvalidated: ids that stop inside a multi-byte character give its leading bytes, so
  // decoding piece by piece and concatenating equals decoding the whole. EOS (256) is the end-of-text marker, not
  // text: it decodes to nothing. Any other id cannot come from this tokenizer and is an Error.
  std::string decode(const std::vector<int64_t>& ids) const override {
    std::string out;
    out.reserve(ids.size());
    for (int64_t id : ids) {
      NEXTRON_CHECK(id >= 0 && id <= kEos, "token id ", id,
                    " is outside the byte tokenizer's vocabulary (0..256): the ids come from a model with another "
                    "tokenizer; pass its tokenizer.json");
      if (id != kEos) out.push_back(static_cast<char>(static_cast<unsigned char>(id)));
    }
    return out;
  }

  int64_t vocab_size() const override { return kEos + 1; }
  std::optional<int64_t> eos_id() const override { return kEos; }
  std::string name() const override { return "byte"; }
};

// ---------------------------------------------------------------------------------------------------------------
// HF tokenizer.json (byte-level BPE)

// GPT-2's bytes_to_unicode() inverted: the printable code point the ByteLevel pre-tokenizer shows for each byte ->
// that byte. Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 bytes, in
// increasing order, are U+0100, U+0101, ... So every mapped code point is below U+0100 + 68.
constexpr uint32_t kByteLevelChars = 0x100 + 68;
const std::array<int, kByteLevelChars>& byte_level_inverse() {
  static const std::array<int, kByteLevelChars> table = [] {
    std::array<int, kByteLevelChars> t{};
    t.fill(-1);
    const auto printable = [](int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE; };
    int next = 0x100;
    for (int b = 0; b < 256; ++b) t[printable(b) ? b : next++] = b;
    return t;
  }();
  return table;
}

// The bytes a vocabulary token stands for under the ByteLevel decoder: each char mapped back to its byte, or, when
// any char is not one of the 256 (a token the byte-level alphabet cannot spell), the token's own UTF-8 bytes, as
// the tokenizers library does.
std::string byte_level_bytes(const std::string& token) {
  const auto& inverse = byte_level_inverse();
  std::string out;
  for (size_t i = 0; i < token.size();) {
    bool ok = true;
    const size_t n = utf8_sequence(token, i, ok);
    const uint32_t cp = ok ? code_point(token, i, n) : kByteLevelChars;
    if (cp >= kByteLevelChars || inverse[cp] < 0) return token;
    out.push_back(static_cast<char>(static_cast<unsigned char>(inverse[cp])));
    i += n;
  }
  return out;
}

// A file's whole contents, or "" with ok = false.
std::string read_file(const std::string& path, bool& ok) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  ok = static_cast<bool>(in) || in.eof();
  return ss.str();
}

// A temporary file that is removed when this goes out of scope; fd is open for reading and writing, close-on-exec
// (a spawned child gets it only where it is dup2'ed).
struct TempFile {
  std::string path;
  int fd = -1;
  explicit TempFile(const std::string& tag) {
    std::string templ = (fs::temp_directory_path() / ("nextron-tokenize-" + tag + "-XXXXXX")).string();
    fd = mkostemp(templ.data(), O_CLOEXEC);
    NEXTRON_CHECK(fd >= 0, "cannot create a temporary file in ", fs::temp_directory_path().string(), ": ",
                  std::strerror(errno), "; set TMPDIR to a writable folder");
    path = templ;
  }
  ~TempFile() {
    if (fd >= 0) ::close(fd);
    ::unlink(path.c_str());
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;

  void write_all(const std::string& data) const {
    for (size_t done = 0; done < data.size();) {
      const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
      if (n < 0 && errno == EINTR) continue;
      NEXTRON_CHECK(n > 0, "cannot write the temporary file ", path, ": ", std::strerror(errno));
      done += static_cast<size_t>(n);
    }
    NEXTRON_CHECK(::lseek(fd, 0, SEEK_SET) == 0, "cannot rewind the temporary file ", path);
  }
  std::string read_all() const {
    bool ok = true;
    std::string s = read_file(path, ok);
    NEXTRON_CHECK(ok, "cannot read the temporary file ", path);
    return s;
  }
};

// Runs argv[0] (looked up in PATH when it has no '/') with stdin from `in`, stdout and stderr into `out` and `err`,
// without a shell (no quoting issues: arguments go through as they are). Returns the wait status.
int run_process(const std::vector<std::string>& argv, const TempFile& in, const TempFile& out, const TempFile& err) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in.fd, STDIN_FILENO);
  posix_spawn_file_actions_adddup2(&actions, out.fd, STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, err.fd, STDERR_FILENO);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  // glibc's posix_spawn reports a failed exec (no such file, not executable) as its return value.
  const int rc = posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  NEXTRON_CHECK(rc == 0, "cannot run Python '", argv[0], "' (", std::strerror(rc),
                ") to encode text with a tokenizer.json: set NEXTRON_PYTHON to a Python that has the `tokenizers` "
                "package (tools/setup.sh installs one in ~/.cache/nextron/venv)");
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    NEXTRON_CHECK(errno == EINTR, "waiting for the tokenizer process failed: ", std::strerror(errno));
  }
  return status;
}

class HFTokenizer final : public Tokenizer {
 public:
  HFTokenizer(std::string file, std::string name) : file_(std::move(file)), name_(std::move(name)) {
    bool ok = true;
    const std::string text = read_file(file_, ok);
    NEXTRON_CHECK(ok, "cannot read tokenizer '", file_, "': ", std::strerror(errno));
    json j;
    try {
      j = json::parse(text);
    } catch (const json::exception& e) {
      throw Error(
          detail::concat("tokenizer '", file_, "' is not valid JSON (", e.what(), "): pass an HF tokenizer.json"));
    }
    NEXTRON_CHECK(j.is_object() && j.contains("model") && j["model"].is_object(), "tokenizer '", file_,
                  "' has no `model` object: pass an HF tokenizer.json (the file `tokenizers` saves)");
    const json& model = j["model"];
    const std::string type = model.value("type", std::string("(missing)"));
    NEXTRON_CHECK(type == "BPE", "tokenizer '", file_, "': model.type is '", type,
                  "', but only byte-level BPE tokenizers (model.type \"BPE\" with decoder.type \"ByteLevel\", as "
                  "Qwen's and GPT-2's) are supported: pass such a tokenizer.json, or --tokenizer byte");
    const json* decoder = j.contains("decoder") ? &j["decoder"] : nullptr;
    const std::string dtype =
        decoder && decoder->is_object() ? decoder->value("type", std::string("(missing)")) : std::string("(none)");
    NEXTRON_CHECK(dtype == "ByteLevel", "tokenizer '", file_, "': decoder.type is '", dtype,
                  "', but only the ByteLevel decoder (byte-level BPE, as Qwen's and GPT-2's tokenizer.json) is "
                  "supported: pass such a tokenizer.json, or --tokenizer byte");
    NEXTRON_CHECK(model.contains("vocab") && model["vocab"].is_object(), "tokenizer '", file_,
                  "': model.vocab is missing or not an object of token -> id: pass an HF tokenizer.json");

    // An id this large means a corrupt file, not a vocabulary; refusing it keeps the table below bounded.
    constexpr int64_t kMaxId = int64_t{1} << 26;
    const auto add = [&](const json& id_json, const std::string& token, Kind kind, const char* where) {
      NEXTRON_CHECK(id_json.is_number_integer(), "tokenizer '", file_, "': ", where, " '", token,
                    "' has a non-integer id: pass an HF tokenizer.json");
      const int64_t id = id_json.get<int64_t>();
      NEXTRON_CHECK(id >= 0 && id < kMaxId, "tokenizer '", file_, "': ", where, " '", token, "' has id ", id,
                    ", outside 0..", kMaxId - 1, ": the file is corrupt");
      if (static_cast<size_t>(id) >= pieces_.size()) {
        pieces_.resize(static_cast<size_t>(id) + 1);
        kinds_.resize(static_cast<size_t>(id) + 1, Kind::kNone);
      }
      // An added token wins over a vocabulary entry with the same id (as in the library, which looks ids up in
      // the added vocabulary first), whichever comes first here.
      const auto i = static_cast<size_t>(id);
      if (kind == Kind::kModel && kinds_[i] == Kind::kAdded) return;
      pieces_[i] = byte_level_bytes(token);
      kinds_[i] = kind;
    };
    for (const auto& [token, id] : model["vocab"].items()) add(id, token, Kind::kModel, "model.vocab entry");
    if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
      NEXTRON_CHECK(j["added_tokens"].is_array(), "tokenizer '", file_,
                    "': added_tokens is not a list: pass an HF tokenizer.json");
      for (const json& t : j["added_tokens"]) {
        NEXTRON_CHECK(t.is_object() && t.contains("id") && t.contains("content") && t["content"].is_string(),
                      "tokenizer '", file_,
                      "': an added_tokens entry lacks `id` or `content`: pass an HF "
                      "tokenizer.json");
        add(t["id"], t["content"].get<std::string>(), Kind::kAdded, "added token");
      }
    }
    NEXTRON_CHECK(!pieces_.empty(), "tokenizer '", file_, "' has an empty vocabulary: pass an HF tokenizer.json");
  }

  std::vector<std::vector<int64_t>> encode(const std::vector<std::string>& texts) const override {
    if (texts.empty()) return {};
    for (size_t i = 0; i < texts.size(); ++i) {
      const size_t bad = first_invalid_utf8(texts[i]);
      NEXTRON_CHECK(bad == std::string::npos, "text ", i, " is not valid UTF-8 (byte ", bad, "): pass UTF-8 text");
    }
    const std::string python = tokenizer_python();
    const std::string script = tokenizer_script();
    NEXTRON_CHECK(fs::is_regular_file(script), "the tokenizer script '", script,
                  "' does not exist: it is tools/nextron_tools/hf_tokenize.py of the nextron source tree, which the "
                  "build names (NEXTRON_SOURCE_DIR); rebuild from the source tree you run from");
    TempFile in("in"), out("out"), err("err");
    in.write_all(json(texts).dump());
    const int status = run_process({python, script, "encode", file_}, in, out, err);
    std::string message = err.read_all();
    while (!message.empty() && (message.back() == '\n' || message.back() == '\r')) message.pop_back();
    NEXTRON_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "encoding with tokenizer '", file_, "' failed (",
                  python, " ", script, " ",
                  WIFEXITED(status) ? "exited with status " + std::to_string(WEXITSTATUS(status))
                                    : "was killed by signal " + std::to_string(WTERMSIG(status)),
                  "): ", message.empty() ? std::string("(no message)") : message);
    json ids;
    try {
      ids = json::parse(out.read_all());
    } catch (const json::exception& e) {
      throw Error(detail::concat("the tokenizer script ", script, " printed something that is not JSON (", e.what(),
                                 "): run it by hand to see why"));
    }
    NEXTRON_CHECK(ids.is_array() && ids.size() == texts.size(), "the tokenizer script ", script, " returned ",
                  ids.is_array() ? std::to_string(ids.size()) : std::string("no list"), " id lists for ", texts.size(),
                  " texts");
    std::vector<std::vector<int64_t>> result;
    result.reserve(texts.size());
    for (const json& row : ids) {
      NEXTRON_CHECK(row.is_array(), "the tokenizer script ", script, " returned a non-list for text ", result.size());
      std::vector<int64_t>& r = result.emplace_back();
      for (const json& id : row) {
        NEXTRON_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0, "the tokenizer script ", script,
                      " returned a bad id ", id.dump(), " for text ", result.size() - 1);
        r.push_back(id.get<int64_t>());
      }
    }
    return result;
  }

  // As Tokenizer.decode(ids, skip_special_tokens=False) of the tokenizers library (checked against 0.23.3 by
  // tests/unit/test_tokenizer.cpp): every token, added and special ones included, goes through the ByteLevel decoder
  // (its chars mapped back to bytes, or its own UTF-8 when the byte-level alphabet cannot spell it, e.g.
  // "<|endoftext|>" stays itself but an added "\u0120x" decodes to " x"), the bytes are concatenated and read as
  // UTF-8 with each ill-formed piece as U+FFFD. So a character split over several tokens decodes whole only when
  // they are decoded together (decoding one token at a time gives U+FFFD for each piece).
  // Ids the tokenizer does not know (above its vocabulary, e.g. a model's padding rows, or gaps) are skipped, as
  // the library skips them; a negative id is an Error.
  std::string decode(const std::vector<int64_t>& ids) const override {
    std::string bytes;
    for (int64_t id : ids) {
      NEXTRON_CHECK(id >= 0, "token id ", id, " is negative: token ids are 0 or more");
      const auto i = static_cast<size_t>(id);
      if (i < pieces_.size() && kinds_[i] != Kind::kNone) bytes += pieces_[i];
    }
    return utf8_lossy(bytes);
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(pieces_.size()); }
  std::optional<int64_t> eos_id() const override { return std::nullopt; }
  std::string name() const override { return name_; }

 private:
  enum class Kind : uint8_t { kNone, kModel, kAdded };
  std::string file_, name_;
  std::vector<std::string> pieces_;  // per id: the bytes the ByteLevel decoder makes of its token
  std::vector<Kind> kinds_;
};

}  // namespace

std::string utf8_lossy(const std::string& bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    bool ok = true;
    const size_t n = utf8_sequence(bytes, i, ok);
    if (ok) {
      out.append(bytes, i, n);
    } else {
      out += "\xEF\xBF\xBD";  // U+FFFD REPLACEMENT CHARACTER
    }
    i += n;
  }
  return out;
}

std::string tokenizer_python() {
  const char* env = std::getenv("NEXTRON_PYTHON");
  return env && *env ? std::string(env) : std::string(NEXTRON_PYTHON_DEFAULT);
}

std::string tokenizer_script() { return std::string(NEXTRON_SOURCE_DIR) + "/tools/nextron_tools/hf_tokenize.py"; }

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec) {
  if (spec == "byte") return std::make_unique<ByteTokenizer>();
  NEXTRON_CHECK(!spec.empty(), "no tokenizer given: pass an HF tokenizer.json (or the folder holding it), or byte");
  // The name preprocess.py records: the last component of the path as given (its folder, or the file itself).
  fs::path given = fs::path(spec).lexically_normal();
  if (given.filename().empty()) given = given.parent_path();
  std::error_code ec;
  const fs::path file = fs::is_directory(spec, ec) ? fs::path(spec) / "tokenizer.json" : fs::path(spec);
  NEXTRON_CHECK(fs::is_regular_file(file, ec), "tokenizer '", spec, "' does not exist",
                fs::is_directory(spec, ec) ? " (the folder holds no tokenizer.json)" : "",
                ": pass an HF tokenizer.json (or the folder holding it), or byte for the built-in byte tokenizer");
  return std::make_unique<HFTokenizer>(fs::absolute(file).lexically_normal().string(), given.filename().string());
}

}  // namespace nextron
