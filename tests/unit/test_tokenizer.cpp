// Tokenizers of nextron-generate (src/generate/tokenizer.h): the byte tokenizer against tools/preprocess.py's
// definition, and byte-level BPE tokenizer.json encode / decode against the HF `tokenizers` library itself.
//
// The suite trains a small byte-level BPE (with special and plain added tokens, NFC, and a post-processor that
// appends <|endoftext|> so that add_special_tokens matters) with the venv's `tokenizers` at set-up, and has the
// library write its own encode / decode results for a set of texts and id sequences; the C++ results must equal
// them. It also writes tokenizer.json files nextron must refuse (WordLevel model, Metaspace decoder).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "generate/tokenizer.h"

#ifndef NEXTRON_SOURCE_DIR
#define NEXTRON_SOURCE_DIR "."
#endif

namespace nextron::test {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Writes the fixture tokenizers and the library's own answers into argv[1]. Kept small and deterministic (the
// trainer is seeded by its input only).
constexpr const char* kMakeFixtures = R"PY(
import json, os, random, sys
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

out = sys.argv[1]
corpus = ["hello world, hello tokenizer", "the quick brown fox\njumps over the lazy dog",
          "h\u00e9llo w\u00f6rld \u4e16\u754c \U0001f642 \u4e16\u754c", "  spaces   and\ttabs\n\nnewlines  "] * 4
tok = Tokenizer(models.BPE())
tok.normalizer = normalizers.NFC()
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<|endoftext|>", "<|im_end|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
tok.train_from_iterator(corpus, trainer)
# Plain added tokens: one the byte-level alphabet cannot spell, one with a space, and two whose every char is in the
# alphabet ("\u00e9" is byte E9, "\u0120" is the space) but which decode as their own text, not as those bytes.
tok.add_tokens([AddedToken(t, normalized=False) for t in ["\u03a9", "ab cd", "\u00e9t\u00e9", "\u0120x"]])
# A special token spelled in the alphabet: decode(skip_special_tokens=False) sends it through the decoder too.
tok.add_special_tokens([AddedToken("<|\u00e9|>", special=True)])
eot = tok.token_to_id("<|endoftext|>")
# Appends <|endoftext|> when add_special_tokens=True: nextron's encode must not.
tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eot)])
os.makedirs(os.path.join(out, "bpe"), exist_ok=True)
tok.save(os.path.join(out, "bpe", "tokenizer.json"))

texts = ["hello world", "  leading, double  spaces and trailing ", "line one\nline two\n\n\ttabbed\r\n",
         "h\u00e9llo \u4e16\u754c \U0001f642", "e\u0301 is NFD, \u00e9 is NFC", "<|endoftext|>inside<|im_end|> text",
         "", "\u03a9 and \u03a9\u03a9, ab cd, \u00e9t\u00e9 \u0120x<|\u00e9|>",
         "numbers 12345 and punctuation!? \u2014 \u201cquotes\u201d",
         "\U0001f600\U0001f642\U0001f680 \u0928\u092e\u0938\u094d\u0924\u0947 \u0645\u0631\u062d\u0628\u0627"]
encode = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in texts]

V = tok.get_vocab_size(with_added_tokens=True)
# GPT-2 bytes_to_unicode, the ByteLevel alphabet in byte order.
bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
cs = bs[:]
n = 0
for b in range(256):
    if b not in bs:
        bs.append(b); cs.append(256 + n); n += 1
byte_char = {b: chr(c) for b, c in zip(bs, cs)}
byte_id = {b: tok.token_to_id(byte_char[b]) for b in range(256)}
assert all(i is not None for i in byte_id.values())

seqs = [e["ids"] for e in encode]
rng = random.Random(1234)
for _ in range(60):  # any ids, unknown ones (>= V) included
    seqs.append([rng.randrange(V + 6) for _ in range(rng.randrange(1, 25))])
ill_formed = ["c080", "e08080", "eda080", "f4908080", "f09f99", "f09f9942", "80", "ff", "e4b8", "e4b8e4b896",
              "41c3", "c3a9c3", "f0288cbc", "fe", "eda0bdedb880"]
for h in ill_formed:
    seqs.append([byte_id[b] for b in bytes.fromhex(h)])
omega = tok.token_to_id("\u03a9")
split = [byte_id[b] for b in "\U0001f642".encode()]
seqs.append(split[:2] + [omega] + split[2:])  # an added token inside a character: both halves are U+FFFD
seqs.append(split[:2] + [eot] + split[2:])
decode = [{"ids": s, "text": tok.decode(s, skip_special_tokens=False)} for s in seqs]
lossy = [{"hex": h, "text": bytes.fromhex(h).decode("utf-8", errors="replace")} for h in ill_formed]

wl = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
wl.pre_tokenizer = pre_tokenizers.Whitespace()
os.makedirs(os.path.join(out, "wordlevel"), exist_ok=True)
wl.save(os.path.join(out, "wordlevel", "tokenizer.json"))
ms = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
ms.decoder = decoders.Metaspace()
os.makedirs(os.path.join(out, "metaspace"), exist_ok=True)
ms.save(os.path.join(out, "metaspace", "tokenizer.json"))

with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as f:
    json.dump({"vocab_size": V, "encode": encode, "decode": decode, "lossy": lossy,
               "with_special": tok.encode("hello", add_special_tokens=True).ids}, f)
)PY";

// A path in single quotes for /bin/sh.
std::string sh_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The message of the Error fn() throws ("" when it throws none).
template <typename F>
std::string error_of(F&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Sets an environment variable for one scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    ::setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (old_) {
      ::setenv(name_, old_->c_str(), 1);
    } else {
      ::unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

class Tokenizer : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // Per process: ctest runs each test in its own process, possibly in parallel.
    dir_ = fs::temp_directory_path() / ("nextron_test_tokenizer_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    { std::ofstream(dir_ / "make_fixtures.py") << kMakeFixtures; }
    const std::string cmd = sh_quote(tokenizer_python()) + " " + sh_quote((dir_ / "make_fixtures.py").string()) + " " +
                            sh_quote(dir_.string()) + " > " + sh_quote((dir_ / "log.txt").string()) + " 2>&1";
    const int rc = std::system(cmd.c_str());
    setup_error_ = rc == 0 ? ""
                           : "making the fixture tokenizers with " + tokenizer_python() + " failed (" + cmd +
                                 "): " + read_text(dir_ / "log.txt") +
                                 "; the tests need the venv of tools/setup.sh (or NEXTRON_PYTHON) with `tokenizers`";
    if (rc == 0) expected_ = json::parse(read_text(dir_ / "expected.json"));
  }
  static void TearDownTestSuite() { fs::remove_all(dir_); }

  static std::string bpe_file() { return (dir_ / "bpe" / "tokenizer.json").string(); }

  static inline fs::path dir_;
  static inline std::string setup_error_;
  static inline json expected_;
};

}  // namespace

// The HF tests need the fixture tokenizers (the byte test does not).
#define NEEDS_FIXTURES() \
  if (!setup_error_.empty()) GTEST_FAIL() << setup_error_

TEST_F(Tokenizer, ByteRoundTripAndEos) {  // needs no Python
  const auto tok = make_tokenizer("byte");
  EXPECT_EQ(tok->name(), "byte");
  EXPECT_EQ(tok->vocab_size(), 257);
  ASSERT_TRUE(tok->eos_id().has_value());
  EXPECT_EQ(*tok->eos_id(), 256);
  // "é" is C3 A9, "世" E4 B8 96, "🙂" F0 9F 99 82: preprocess.py's tokens are exactly the UTF-8 bytes.
  const std::string text = "a \xC3\xA9\n\xE4\xB8\x96\xF0\x9F\x99\x82";
  const auto ids = tok->encode({text, ""});
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_EQ(ids[0], (std::vector<int64_t>{'a', ' ', 0xC3, 0xA9, '\n', 0xE4, 0xB8, 0x96, 0xF0, 0x9F, 0x99, 0x82}));
  EXPECT_TRUE(ids[1].empty());
  std::vector<int64_t> with_eos = ids[0];
  with_eos.push_back(256);  // EOS is not text: it decodes to nothing
  EXPECT_EQ(tok->decode(with_eos), text);
  EXPECT_EQ(tok->decode({256}), "");
  // Split inside a character, the pieces concatenate to the whole (raw bytes, no replacement characters).
  EXPECT_EQ(tok->decode({ids[0].begin(), ids[0].begin() + 7}) + tok->decode({ids[0].begin() + 7, ids[0].end()}), text);
  EXPECT_NE(error_of([&] { tok->decode({257}); }).find("outside the byte tokenizer's vocabulary"), std::string::npos);
  EXPECT_NE(error_of([&] { tok->decode({-1}); }), "");
  EXPECT_NE(error_of([&] { tok->encode({"ok", "bad \xC3("}); }).find("text 1 is not valid UTF-8"), std::string::npos);
}

TEST_F(Tokenizer, EncodeEqualsLibrary) {
  NEEDS_FIXTURES();
  const auto tok = make_tokenizer(bpe_file());
  std::vector<std::string> texts;
  std::vector<std::vector<int64_t>> want;
  for (const json& c : expected_["encode"]) {
    texts.push_back(c["text"].get<std::string>());
    want.push_back(c["ids"].get<std::vector<int64_t>>());
  }
  // All at once (order kept), and one at a time.
  const auto got = tok->encode(texts);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(got[i], want[i]) << "text: " << texts[i];
  EXPECT_EQ(tok->encode({texts[3]}).at(0), want[3]);
  EXPECT_TRUE(tok->encode({}).empty());
  // The library appends <|endoftext|> with add_special_tokens=True; encode() adds no special tokens.
  EXPECT_NE(tok->encode({"hello"})[0], expected_["with_special"].get<std::vector<int64_t>>());
}

TEST_F(Tokenizer, DecodeEqualsLibrary) {
  NEEDS_FIXTURES();
  const auto tok = make_tokenizer(bpe_file());
  EXPECT_EQ(tok->vocab_size(), expected_["vocab_size"].get<int64_t>());
  EXPECT_FALSE(tok->eos_id().has_value());  // the model's config gives it
  EXPECT_EQ(tok->name(), "tokenizer.json");
  int n = 0;
  for (const json& c : expected_["decode"]) {
    const auto ids = c["ids"].get<std::vector<int64_t>>();
    EXPECT_EQ(tok->decode(ids), c["text"].get<std::string>()) << "ids: " << c["ids"].dump();
    ++n;
  }
  EXPECT_GT(n, 80);
  // Text round trip where NFC leaves the text as it is.
  EXPECT_EQ(tok->decode(tok->encode({"h\xC3\xA9llo \xE4\xB8\x96\xE7\x95\x8C \xF0\x9F\x99\x82\n x"})[0]),
            "h\xC3\xA9llo \xE4\xB8\x96\xE7\x95\x8C \xF0\x9F\x99\x82\n x");
  EXPECT_NE(error_of([&] { tok->decode({-3}); }).find("negative"), std::string::npos);
}

TEST_F(Tokenizer, Utf8LossyEqualsPython) {
  NEEDS_FIXTURES();
  for (const json& c : expected_["lossy"]) {
    std::string bytes;
    const std::string hex = c["hex"].get<std::string>();
    for (size_t i = 0; i < hex.size(); i += 2) bytes.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), 0, 16)));
    EXPECT_EQ(utf8_lossy(bytes), c["text"].get<std::string>()) << "bytes: " << hex;
  }
  EXPECT_EQ(utf8_lossy("plain \xE4\xB8\x96"), "plain \xE4\xB8\x96");
}

TEST_F(Tokenizer, FolderSpec) {
  NEEDS_FIXTURES();
  const auto tok = make_tokenizer((dir_ / "bpe").string() + "/");
  EXPECT_EQ(tok->name(), "bpe");
  EXPECT_EQ(tok->decode(expected_["encode"][0]["ids"].get<std::vector<int64_t>>()), "hello world");
}

TEST_F(Tokenizer, RefusesOtherTokenizers) {
  NEEDS_FIXTURES();
  const std::string wordlevel = error_of([&] { make_tokenizer((dir_ / "wordlevel").string()); });
  EXPECT_NE(wordlevel.find("model.type is 'WordLevel'"), std::string::npos) << wordlevel;
  EXPECT_NE(wordlevel.find("byte-level BPE"), std::string::npos) << wordlevel;
  const std::string metaspace = error_of([&] { make_tokenizer((dir_ / "metaspace" / "tokenizer.json").string()); });
  EXPECT_NE(metaspace.find("decoder.type is 'Metaspace'"), std::string::npos) << metaspace;
  std::ofstream(dir_ / "broken.json") << "{\"model\": ";
  const std::string broken = error_of([&] { make_tokenizer((dir_ / "broken.json").string()); });
  EXPECT_NE(broken.find("is not valid JSON"), std::string::npos) << broken;
}

TEST_F(Tokenizer, RefusesMissingFile) {
  NEEDS_FIXTURES();
  const std::string missing = (dir_ / "nope" / "tokenizer.json").string();
  const std::string e1 = error_of([&] { make_tokenizer(missing); });
  EXPECT_NE(e1.find("'" + missing + "' does not exist"), std::string::npos) << e1;
  EXPECT_NE(e1.find("or byte"), std::string::npos) << e1;
  fs::create_directories(dir_ / "empty");
  const std::string e2 = error_of([&] { make_tokenizer((dir_ / "empty").string()); });
  EXPECT_NE(e2.find("holds no tokenizer.json"), std::string::npos) << e2;
  EXPECT_NE(error_of([&] { make_tokenizer(""); }), "");
}

TEST_F(Tokenizer, EncodeNamesMissingPythonOrPackage) {
  NEEDS_FIXTURES();
  const auto tok = make_tokenizer(bpe_file());
  {
    ScopedEnv env("NEXTRON_PYTHON", (dir_ / "no-such-python").string());
    const std::string e = error_of([&] { tok->encode({"x"}); });
    EXPECT_NE(e.find("set NEXTRON_PYTHON"), std::string::npos) << e;
  }
  {
    // The same Python without site-packages (-S) has no `tokenizers`.
    const fs::path wrapper = dir_ / "python-without-site";
    std::ofstream(wrapper) << "#!/bin/sh\nexec " << sh_quote(tokenizer_python()) << " -S \"$@\"\n";
    fs::permissions(wrapper, fs::perms::owner_all);
    ScopedEnv env("NEXTRON_PYTHON", wrapper.string());
    const std::string e = error_of([&] { tok->encode({"x"}); });
    EXPECT_NE(e.find("cannot import the `tokenizers` package"), std::string::npos) << e;
  }
  // The tokenizer file vanished after loading: the script's message comes through.
  const fs::path copy = dir_ / "copy.json";
  fs::copy_file(bpe_file(), copy);
  const auto tok2 = make_tokenizer(copy.string());
  fs::remove(copy);
  const std::string e = error_of([&] { tok2->encode({"x"}); });
  EXPECT_NE(e.find("does not exist"), std::string::npos) << e;
  EXPECT_NE(error_of([&] { tok->encode({"\xFF"}); }).find("not valid UTF-8"), std::string::npos);
}

}  // namespace nextron::test
