// A checkpoint save that runs out of space must end with one clear nextron::Error, leave no checkpoint of that step
// (complete or not) and the previous one intact, and the process must then exit normally: HDF5 1.10 crashes in its
// exit handler when a file's close failed for lack of space (a handle closed twice). Each save runs in a forked
// child that ends with exit(), so that crash fails the test. Out of space is simulated with RLIMIT_FSIZE (writes
// past the limit fail with EFBIG; SIGXFSZ ignored), and, when this process may mount, with a small tmpfs (ENOSPC).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint/hf_checkpoint.h"
#include "checkpoint/train_checkpoint.h"
#include "core/error.h"

namespace nextron::test {

namespace fs = std::filesystem;

namespace {

const std::string kFixture = std::string(NEXTRON_FIXTURES_DIR) + "/hybrid_moe";

struct SmallRun {
  ModelConfig config = read_hf_config(kFixture);
  ParamTable table{config};
  std::vector<float> params, exp_avg, exp_avg_sq;
  SmallRun() {
    std::mt19937 rng(5);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (int64_t i = 0; i < table.total_numel(); ++i) {
      params.push_back(u(rng));
      exp_avg.push_back(u(rng));
      exp_avg_sq.push_back(std::abs(u(rng)));
    }
  }
  std::string save(const fs::path& root, int64_t step) const {
    TrainState state;
    state.step = step;
    state.rng_state = "0";
    state.scheduler = nlohmann::json::object();
    state.args = nlohmann::json::object();
    const OptimizerShard shard{FlatRange{0, table.total_numel()}, exp_avg.data(), exp_avg_sq.data(), step, {}};
    return save_train_checkpoint(root.string(), config, table, params.data(), shard, state, 0);
  }
};

std::string read_text(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Saves step 2 under `root` in a child after `limit()` (run in the child) and checks how it ended: the child
// must catch a nextron::Error about disk space naming `file` (the file that ran out), print only that, and exit 0
// (its HDF5 exit handler included).
void expect_clean_failure(const SmallRun& run, const fs::path& root, const std::function<void()>& limit,
                          const std::string& what, const std::string& file) {
  const fs::path log = root.string() + ".stderr";
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::freopen(log.c_str(), "w", stderr);
    ::alarm(60);
    limit();
    int code = 0;
    try {
      run.save(root, 2);
      std::fprintf(stderr, "the save succeeded\n");
      code = 3;
    } catch (const Error& e) {
      std::fprintf(stderr, "%s\n", e.what());
    }
    std::exit(code);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  const std::string err = read_text(log);
  fs::remove(log);
  ASSERT_TRUE(WIFEXITED(status)) << what << ": the process died with signal "
                                 << (WIFSIGNALED(status) ? strsignal(WTERMSIG(status)) : "?") << "; stderr:\n"
                                 << err;
  EXPECT_EQ(WEXITSTATUS(status), 0) << what << ": " << err;
  EXPECT_NE(err.find("free disk space"), std::string::npos) << what << ": " << err;
  EXPECT_NE(err.find(file), std::string::npos) << what << ": the error does not name " << file << ":\n" << err;
  EXPECT_EQ(err.find("HDF5"), std::string::npos) << what << ": HDF5's own error stack was printed:\n" << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << what << ": expected one message line:\n" << err;
  // Nothing of step 2 is left, and step 1 is still the newest complete checkpoint.
  for (const auto& e : fs::directory_iterator(root))
    EXPECT_EQ(e.path().filename().string().rfind("step_00000002", 0), std::string::npos)
        << what << ": left " << e.path();
  EXPECT_EQ(find_latest_checkpoint(root.string()), train_checkpoint_dir(root.string(), 1)) << what;
}

TEST(DiskFull, CheckpointSaveWithAFileSizeLimitFailsCleanly) {
  const SmallRun run;
  const fs::path root = fs::temp_directory_path() / ("nextron_disk_full_" + std::to_string(::getpid()));
  fs::remove_all(root);
  const fs::path first = run.save(root, 1);
  // The shard (parameters and both moments) is written first and is the larger file; metadata.h5 follows.
  const uintmax_t shard = fs::file_size(first / "shard_00000.bin"), metadata = fs::file_size(first / "metadata.h5");
  ASSERT_LT(metadata, shard);
  // Limits that stop the shard at once, partway, near its end and one byte short of it.
  for (const uintmax_t limit : {uintmax_t{512}, uintmax_t{8192}, shard / 2, shard - 64, shard - 1}) {
    expect_clean_failure(
        run, root,
        [limit] {
          ::signal(SIGXFSZ, SIG_IGN);
          const rlimit r{limit, limit};
          ::setrlimit(RLIMIT_FSIZE, &r);
        },
        "RLIMIT_FSIZE " + std::to_string(limit), "shard_00000.bin");
  }
  fs::remove_all(root);
}

TEST(DiskFull, CheckpointSaveOnAFullTmpfsFailsCleanly) {
  const SmallRun run;
  const fs::path mnt = fs::temp_directory_path() / ("nextron_tmpfs_" + std::to_string(::getpid()));
  fs::create_directories(mnt);
  const fs::path scratch = fs::temp_directory_path() / ("nextron_tmpfs_src_" + std::to_string(::getpid()));
  fs::remove_all(scratch);
  const fs::path first = run.save(scratch, 1);
  const uintmax_t shard = fs::file_size(first / "shard_00000.bin"), metadata = fs::file_size(first / "metadata.h5");
  fs::remove_all(scratch);
  // Room for step 1 and part of step 2: step 2 runs out in its shard, or in metadata.h5 after the shard was written.
  // The writer reserves a file's data plus 256 KiB before writing it and gives back what it did not use when it is
  // finished, so with room for the shard's pages and 256 KiB the shard is written and metadata.h5's reservation
  // fails.
  constexpr uintmax_t kReserve = 256 * 1024, kPage = 4096;
  const uintmax_t shard_pages = (shard + kPage - 1) / kPage * kPage;
  ASSERT_GT(metadata, 0u);
  for (const auto& [room, file] :
       {std::pair<uintmax_t, const char*>{shard / 2, "shard_00000.bin"}, {shard_pages + kReserve, "metadata.h5"}}) {
    if (::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=64m") != 0) {
      fs::remove(mnt);
      GTEST_SKIP() << "cannot mount a tmpfs here (" << std::strerror(errno) << "); the RLIMIT_FSIZE test covers this";
    }
    struct Unmount {
      fs::path p;
      ~Unmount() { ::umount(p.c_str()); }
    } unmount{mnt};
    const fs::path root = mnt / "run";
    run.save(root, 1);
    // Shrinks the file system to what step 1 uses plus `room`.
    struct statvfs st {};
    ASSERT_EQ(::statvfs(mnt.c_str(), &st), 0);
    const uintmax_t used = static_cast<uintmax_t>(st.f_blocks - st.f_bfree) * st.f_frsize;
    const std::string size = "size=" + std::to_string(used + room);
    ASSERT_EQ(::mount("tmpfs", mnt.c_str(), "tmpfs", MS_REMOUNT, size.c_str()), 0) << std::strerror(errno);
    expect_clean_failure(
        run, root, [] {}, "tmpfs " + size + " (step 1 uses " + std::to_string(used) + ")", file);
  }
  fs::remove(mnt);
}

}  // namespace

}  // namespace nextron::test
