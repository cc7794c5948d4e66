// Fuzzing the readers of the files nextron loads: token datasets, training checkpoints and safetensors. Each case
// mutates a small valid file at a random place (one byte, a short run of bytes, or a truncation) and loads it in a
// forked child under a time limit and an address-space limit, so a hang, a crash (also one in HDF5's exit handler)
// or an unbounded allocation is reported as a failure naming the case instead of taking the test binary down. A
// mutated file must either load (with sane content) or be refused with a nextron::Error.
//
// The number of cases per format is fixed (2,450 cases, about 20-40 s on 2 cores); NEXTRON_FUZZ_SCALE=<k> runs k
// times as many. The training checkpoint's index records are also tried field by field with hostile values (a fixed
// list of about 150 cases).
#include <gtest/gtest.h>
#include <hdf5.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "checkpoint/hf_checkpoint.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/train_checkpoint.h"
#include "core/error.h"
#include "data/token_dataset.h"

namespace nextron::test {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr int kCaseTimeoutS = 10;                    // a load of these small files takes milliseconds
constexpr uint64_t kCaseMemory = uint64_t{1} << 30;  // address space a case may add to what the parent maps
const std::string kFixture = std::string(NEXTRON_FIXTURES_DIR) + "/hybrid_moe";

int scale() {
  const char* s = std::getenv("NEXTRON_FUZZ_SCALE");
  return s != nullptr && std::atoi(s) > 0 ? std::atoi(s) : 1;
}

fs::path fresh_dir(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("nextron_fuzz_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

std::string read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

uint64_t virtual_bytes() {
  std::ifstream f("/proc/self/statm");
  uint64_t pages = 0;
  f >> pages;
  return pages * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
}

// Child exit codes.
constexpr int kLoaded = 0, kRefused = 1, kWrong = 2, kOtherException = 3, kLeaked = 4;

// Runs `load` in a forked child. It returns "" when the file loaded with sane content, a description when it loaded
// but the content is wrong, or throws. The child ends with exit(), so HDF5's exit handler runs there too.
// Returns the child's exit code, or 128 + signal when it died (SIGALRM: the time limit).
// What the child printed on stderr is returned in `err`: HDF5 must print nothing (its error stack is silenced, and
// "infinite loop closing library" at exit means something was left open).
int run_isolated(const std::function<std::string()>& load, std::string* err) {
  const fs::path log = fs::temp_directory_path() / ("nextron_fuzz_child_" + std::to_string(::getpid()) + ".log");
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::freopen(log.c_str(), "w", stderr);
    const rlim_t limit = virtual_bytes() + kCaseMemory;
    const rlimit as{limit, limit};
    ::setrlimit(RLIMIT_AS, &as);
    ::alarm(kCaseTimeoutS);
    int code = kLoaded;
    try {
      const std::string wrong = load();
      if (!wrong.empty()) {
        std::fprintf(stderr, "loaded wrong content: %s\n", wrong.c_str());
        code = kWrong;
      }
    } catch (const Error&) {
      code = kRefused;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "not a nextron::Error: %s\n", e.what());
      code = kOtherException;
    }
    // Every HDF5 handle must be closed by now, on success and error paths alike: none left for HDF5's exit handler.
    if (H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL) > 0) {
      std::fprintf(stderr, "HDF5 objects left open\n");
      code = kLeaked;
    }
    std::exit(code);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  *err = read_bytes(log);
  fs::remove(log);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string describe(int code) {
  switch (code) {
    case kWrong:
      return "loaded wrong content";
    case kLeaked:
      return "left HDF5 objects open";
    case kOtherException:
      return "threw something other than nextron::Error (e.g. std::bad_alloc: an unbounded allocation)";
    case 128 + SIGALRM:
      return "hung (killed after " + std::to_string(kCaseTimeoutS) + " s)";
    default:
      return code > 128 ? "crashed with signal " + std::to_string(code - 128) + " (" + strsignal(code - 128) + ")"
                        : "exit code " + std::to_string(code);
  }
}

// One random mutation of `bytes`: a byte changed, a run of 2..16 bytes overwritten, or a truncation. Half the
// offsets fall in the first or last 4 KiB, where HDF5 keeps most of its metadata and safetensors its header.
struct Mutation {
  std::string kind;
  size_t offset = 0, length = 0;
  std::string bytes;
};

Mutation mutate(const std::string& original, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Mutation m;
  const size_t n = original.size(), edge = std::min<size_t>(n, 4096);
  switch (rng() % 4) {
    case 0:
      m.offset = rng() % edge;
      break;
    case 1:
      m.offset = n - 1 - rng() % edge;
      break;
    default:
      m.offset = rng() % n;
  }
  m.bytes = original;
  switch (rng() % 5) {
    case 0:
    case 1:
      m.kind = "byte";
      m.length = 1;
      m.bytes[m.offset] = static_cast<char>(m.bytes[m.offset] ^ static_cast<char>(1 + rng() % 255));
      break;
    case 2:
    case 3:
      m.kind = "run";
      m.length = std::min<size_t>(2 + rng() % 15, n - m.offset);
      for (size_t i = 0; i < m.length; ++i) m.bytes[m.offset + i] = static_cast<char>(rng());
      if (m.bytes == original) m.bytes[m.offset] = static_cast<char>(m.bytes[m.offset] ^ 1);
      break;
    default:
      m.kind = "truncate";
      m.length = n - m.offset;
      m.bytes.resize(m.offset);
  }
  return m;
}

struct FuzzStats {
  int cases = 0, loaded = 0, refused = 0;
  std::vector<std::string> failures;
};

// `cases` mutations of file `target` (holding `original`), each loaded by `load` in a child. `prepare` runs after the
// mutated file is written (e.g. to update a manifest); `must_refuse` makes a successful load a failure.
void fuzz(const std::string& label, const fs::path& target, int cases, uint64_t seed_base,
          const std::function<std::string()>& load, FuzzStats& stats, const std::function<void()>& prepare = {},
          bool must_refuse = false) {
  const std::string original = read_bytes(target);
  ASSERT_FALSE(original.empty()) << target;
  for (int i = 0; i < cases; ++i) {
    const uint64_t seed = seed_base + static_cast<uint64_t>(i);
    const Mutation m = mutate(original, seed);
    write_bytes(target, m.bytes);
    if (prepare) prepare();
    std::string err;
    int code = run_isolated(load, &err);
    if (must_refuse && code == kLoaded) code = kWrong;
    ++stats.cases;
    if ((code == kLoaded || code == kRefused) && err.find("HDF5") != std::string::npos) {
      stats.failures.push_back(label + " seed " + std::to_string(seed) + " (" + m.kind + " at offset " +
                               std::to_string(m.offset) + "): HDF5 printed: " + err.substr(0, err.find('\n')));
    } else if (code == kLoaded) {
      ++stats.loaded;
    } else if (code == kRefused) {
      ++stats.refused;
    } else {
      stats.failures.push_back(label + " seed " + std::to_string(seed) + " (" + m.kind + " at offset " +
                               std::to_string(m.offset) + ", " + std::to_string(m.length) +
                               " bytes): " + describe(code));
    }
  }
  write_bytes(target, original);
  if (prepare) prepare();
}

void report(const std::string& format, const FuzzStats& s) {
  std::printf("[fuzz] %s: %d cases, %d loaded, %d refused with nextron::Error, %zu failed\n", format.c_str(), s.cases,
              s.loaded, s.refused, s.failures.size());
  for (const auto& f : s.failures) ADD_FAILURE() << f;
}

// ---------------------------------------------------------------------------------------------------------------

TEST(FileFuzz, TokenDataset) {
  const fs::path dir = fresh_dir("tokens");
  const fs::path path = dir / "data.h5";
  std::mt19937_64 rng(7);
  std::vector<uint32_t> tokens;
  std::vector<int64_t> offsets{0};
  for (int d = 0; d < 24; ++d) {
    const int len = 1 + static_cast<int>(rng() % 80);
    for (int i = 0; i + 1 < len; ++i) tokens.push_back(static_cast<uint32_t>(rng() % 256));
    tokens.push_back(256);
    offsets.push_back(static_cast<int64_t>(tokens.size()));
  }
  write_token_dataset(path.string(), tokens, offsets, "byte", "byte", 257, 256);
  const int64_t num_tokens = static_cast<int64_t>(tokens.size()), num_docs = static_cast<int64_t>(offsets.size()) - 1;
  {
    const TokenDataset d = TokenDataset::open(path.string());  // the unmutated file loads
    ASSERT_EQ(d.num_tokens(), num_tokens);
  }
  ASSERT_EQ(read_bytes(path)[8], 3) << "not HDF5 1.10's format (superblock version 3, checksummed metadata)";
  FuzzStats stats;
  fuzz(
      "data.h5", path, 800 * scale(), 1000,
      [&]() -> std::string {
        const TokenDataset d = TokenDataset::open(path.string());
        if (d.num_tokens() != num_tokens || d.num_docs() != num_docs || d.vocab_size() != 257 || d.eos_id() != 256 ||
            d.tokenizer() != "byte" || d.tokenizer_name() != "byte")
          return "metadata differs from what was written";
        std::vector<int64_t> buf(static_cast<size_t>(d.num_tokens()));
        d.read(0, d.num_tokens(), buf.data());
        return "";
      },
      stats);
  report("token dataset", stats);
  fs::remove_all(dir);
}

// A tiny training checkpoint (the hybrid_moe fixture's model) with random contents.
struct TinyRun {
  ModelConfig config = read_hf_config(kFixture);
  ParamTable table{config};
  std::vector<float> params, exp_avg, exp_avg_sq;
  TrainState state;
  AdamWHyper hyper;

  TinyRun() {
    const int64_t n = table.total_numel();
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (int64_t i = 0; i < n; ++i) {
      params.push_back(u(rng));
      exp_avg.push_back(1e-3f * u(rng));
      exp_avg_sq.push_back(1e-6f * std::abs(u(rng)));
    }
    // The alignment gaps between entries (ParamTable::kAlign) stay zero in training and are not stored.
    std::vector<bool> in_entry(static_cast<size_t>(n), false);
    for (const ParamSpec& s : table.specs()) std::fill_n(in_entry.begin() + s.offset, s.numel(), true);
    for (int64_t i = 0; i < n; ++i)
      if (!in_entry[static_cast<size_t>(i)]) params[i] = exp_avg[i] = exp_avg_sq[i] = 0.0f;
    state.step = 7;
    state.data_position = 56;
    state.consumed_tokens = 3584;
    state.rng_state = "12345";
    state.scheduler = {{"style", "cosine"}};
    state.args = {{"seq_len", 64}};
  }
  std::string save(const fs::path& root) const {
    const OptimizerShard shard{FlatRange{0, table.total_numel()}, exp_avg.data(), exp_avg_sq.data(), 7, hyper};
    return save_train_checkpoint(root.string(), config, table, params.data(), shard, state, 0);
  }
  // Loads `dir`; "" when what came back is this run's state (the parameters may differ when `exact` is false).
  std::string load(const std::string& dir, bool exact) const {
    const int64_t n = table.total_numel();
    std::vector<float> p(static_cast<size_t>(n)), m(static_cast<size_t>(n)), v(static_cast<size_t>(n));
    const LoadedCheckpoint c = load_train_checkpoint(dir, config, table, p.data(), FlatRange{0, n}, m.data(), v.data());
    if (c.state.step != state.step || c.state.data_position != state.data_position) return "the state differs";
    if (exact && (p != params || m != exp_avg || v != exp_avg_sq)) return "the parameters or moments differ";
    return "";
  }
};

// Rewrites the manifest entry of `name` to the file's current size and checksum, as if the damage had happened
// before the save computed them: the HDF5 reader itself must then cope with the damaged file.
void reseal(const fs::path& dir, const std::string& name) {
  json manifest = json::parse(read_bytes(dir / "manifest.json"));
  const std::string bytes = read_bytes(dir / name);
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(xxh64(bytes.data(), bytes.size())));
  for (json& f : manifest["files"]) {
    if (f["name"] == name) {
      f["bytes"] = bytes.size();
      f["xxh64"] = hex;
    }
  }
  write_bytes(dir / "manifest.json", manifest.dump(2) + "\n");
}

TEST(FileFuzz, TrainCheckpoint) {
  const fs::path root = fresh_dir("ckpt");
  const TinyRun run;
  const std::string dir = run.save(root);
  ASSERT_EQ(run.load(dir, true), "");
  ASSERT_EQ(read_bytes(fs::path(dir) / "metadata.h5")[8], 3) << "metadata.h5 is not in HDF5 1.10's checksummed format";
  FuzzStats sealed, unsealed;
  uint64_t seed = 2000;
  // Damage the manifest does not know about: every file, and every such load must be refused, except that damage
  // to the manifest's JSON whitespace is harmless (an exact load passes there).
  for (const char* name : {"metadata.h5", "shard_00000.bin", "state.json", "manifest.json"}) {
    const bool checksummed = std::string(name) != "manifest.json";
    fuzz(
        std::string(name) + " (manifest unchanged)", fs::path(dir) / name, 50 * scale(), seed,
        [&] { return run.load(dir, true); }, unsealed, {}, /*must_refuse=*/checksummed);
    seed += 1000;
  }
  report("training checkpoint, manifest catches the damage", unsealed);
  // Damage behind a matching manifest: metadata.h5 and the shard's header are parsed, and must load or be refused,
  // never crash.
  for (const auto& [name, cases] : {std::pair<const char*, int>{"metadata.h5", 400}, {"shard_00000.bin", 250}}) {
    const std::string n = name;
    fuzz(
        n + " (manifest resealed)", fs::path(dir) / name, cases * scale(), seed, [&] { return run.load(dir, false); },
        sealed, [&] { reseal(dir, n); });
    seed += 1000;
  }
  report("training checkpoint, HDF5 reader on damaged files", sealed);
  ASSERT_EQ(run.load(dir, true), "");  // restored
  fs::remove_all(root);
}

// The run groups indexed in metadata.h5 are raw dataset bytes (no HDF5 checksum covers them): each field of each
// index record set to hostile values (zero, negative, past the model, overflowing products), with the manifest
// resealed, must load or be refused, never crash, hang or allocate without bound.
TEST(FileFuzz, TrainCheckpointIndexRecords) {
  const fs::path root = fresh_dir("ckpt_index");
  const TinyRun run;
  const std::string dir = run.save(root);
  const fs::path metadata = fs::path(dir) / "metadata.h5";
  const std::string original = read_bytes(metadata);
  const int64_t n = run.table.total_numel();
  // One process saving the whole model: one params group and one moments group, each [0, n) in one run.
  const std::vector<int64_t> expected = {0, 0, 0, n, n, 1, 0, 0, 1, 0, n, n, 1, 0};
  const std::string pattern(reinterpret_cast<const char*>(expected.data()), expected.size() * sizeof(int64_t));
  const size_t at = original.find(pattern);
  ASSERT_NE(at, std::string::npos) << "the index records were not found in metadata.h5";
  ASSERT_EQ(original.find(pattern, at + 1), std::string::npos);
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max(), kMin = std::numeric_limits<int64_t>::min();
  std::vector<std::vector<int64_t>> variants;
  for (size_t field = 0; field < expected.size(); ++field)
    for (const int64_t v :
         {int64_t{0}, int64_t{1}, int64_t{-1}, int64_t{2}, n / 2, n - 1, n + 1, 2 * n, int64_t{1} << 40, kMax, kMin}) {
      std::vector<int64_t> r = expected;
      r[field] = v;
      if (r != expected) variants.push_back(r);
    }
  // (count, stride, repeats) of the params group: single-element rows, overlapping rows, products that overflow.
  for (const auto& [count, stride, repeats] :
       std::vector<std::tuple<int64_t, int64_t, int64_t>>{{1, 1, n},
                                                          {1, 0, n},
                                                          {n, 0, 1},
                                                          {n, -1, 1},
                                                          {2, 1, n / 2},
                                                          {1, int64_t{1} << 62, n},
                                                          {int64_t{1} << 40, int64_t{1} << 40, int64_t{1} << 30},
                                                          {1, kMax, 2},
                                                          {n, n, kMax}}) {
    std::vector<int64_t> r = expected;
    r[3] = count;
    r[4] = stride;
    r[5] = repeats;
    variants.push_back(r);
  }
  FuzzStats stats;
  for (size_t i = 0; i < variants.size(); ++i) {
    std::string bytes = original;
    bytes.replace(at, pattern.size(), reinterpret_cast<const char*>(variants[i].data()), pattern.size());
    write_bytes(metadata, bytes);
    reseal(dir, "metadata.h5");
    std::string err;
    const int code = run_isolated([&] { return run.load(dir, false); }, &err);
    ++stats.cases;
    if (code == kLoaded) {
      ++stats.loaded;
    } else if (code == kRefused) {
      ++stats.refused;
    } else {
      std::ostringstream record;
      record << "index records";
      for (const int64_t v : variants[i]) record << ' ' << v;
      record << ": " << describe(code) << ' ' << err.substr(0, err.find('\n'));
      stats.failures.push_back(record.str());
    }
  }
  report("training checkpoint index records", stats);
  write_bytes(metadata, original);
  reseal(dir, "metadata.h5");
  ASSERT_EQ(run.load(dir, true), "");
  fs::remove_all(root);
}

TEST(FileFuzz, Safetensors) {
  const fs::path dir = fresh_dir("safetensors");
  const fs::path path = dir / "model.safetensors";
  SafetensorsWriter w;
  std::vector<float> a(48), b(40);
  for (size_t i = 0; i < a.size(); ++i) a[i] = 0.25f * static_cast<float>(i) - 3.f;
  for (size_t i = 0; i < b.size(); ++i) b[i] = 1.f / (1.f + static_cast<float>(i));
  const std::vector<int64_t> c{1, -2, 3, 1 << 20};
  w.add_f32("model.embed_tokens.weight", a.data(), {6, 8});
  w.add_f32("model.norm.weight", b.data(), {40}, DType::bf16);
  w.add_i64("input_ids", c.data(), {2, 2});
  w.write(path.string(), {{"format", "pt"}});
  FuzzStats stats;
  fuzz(
      "model.safetensors", path, 800 * scale(), 5000,
      [&]() -> std::string {
        const SafetensorsReader r(path.string());
        for (const std::string& name : r.names()) {
          const SafetensorsEntry& e = r.entry(name);
          if (e.dtype == "I64" || e.dtype == "I32") {
            (void)r.read_i64(name);
          } else {
            (void)r.read_f32(name);
          }
        }
        return "";
      },
      stats);
  report("safetensors", stats);
  fs::remove_all(dir);
}

}  // namespace

}  // namespace nextron::test
